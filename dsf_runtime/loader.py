"""Load a compressed model directory as a ready Hugging Face model whose compressed linears stay packed.

The model is built from ``config.json`` on the ``meta`` device, so no dense weight is ever allocated; compressed
layers become ``FactorizedLinear``/``SparseLinear`` modules whose buffers are read straight to the device, the
other tensors are read straight to the device and assigned, tied weights are re-tied and non-persistent buffers
(rotary frequencies) are recomputed. Nothing is downloaded.

On CUDA (when Triton imports) each compressed layer is converted once, right after it is read, to the layout of
the Triton kernels (``FactorizedLinear.to_kernels``): the module keeps only that representation, the packed copy
is released before the next layer is read, so the peak is one layer above the converted model. Without Triton the
packed modules stay and the pure-torch path runs (the reason is logged). Run ``dsf_runtime.kernel_backend.warmup``
(or one eager forward) before capturing a CUDA graph; ``dsf_runtime.generation`` does this for generation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dsf_runtime import kernel_backend
from dsf_runtime.checkpoint import CheckpointError, CompressedCheckpoint, open_compressed
from dsf_runtime.modules import replace_linear

__all__ = ["from_pretrained", "load_tokenizer"]

logger = logging.getLogger(__name__)


def from_pretrained(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    kernels: bool | None = None,
):
    """Load a compressed directory (any layout) as a ``transformers`` causal LM in eval mode.

    Args:
        directory: written by ``save_compressed`` (``dsf compress`` / ``dsf export``).
        device: where every tensor is loaded, directly (``"cpu"``, ``"cuda:0"``, ...).
        dtype: cast floating tensors and factor values to this dtype; None keeps the stored dtypes.
        kernels: convert the compressed layers for the Triton kernels at load time. None (default): on CUDA when
            the kernels can run there, else keep the packed layers (logging why on CUDA); True: always (raises
            when they cannot run, e.g. on the CPU outside ``TRITON_INTERPRET=1``); False: never.

    Returns:
        A ``PreTrainedModel``; ``generate()`` works. Converted layers have other buffer names than the
        directory (see ``dsf_runtime.modules``).

    Raises:
        CheckpointError: the directory is incomplete or a tensor is missing, unexpected or invalid.
        RuntimeError: ``kernels=True`` but the kernels cannot run on ``device``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    ckpt = open_compressed(directory)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    use = _use_kernels(kernels, device)
    for fqn in ckpt.layers:
        replace_linear(model, {fqn: ckpt.load_layer(fqn, device)}, dtype=dtype, kernels=use)
    _load_uncompressed(model, ckpt, device, dtype)
    _materialize_non_persistent_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{directory}: no data for {left[:5]} after loading; {_fix(model)}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()


def load_tokenizer(directory: str | os.PathLike[str]):
    """The tokenizer saved in a compressed directory (``AutoTokenizer``, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(directory))


def _use_kernels(kernels: bool | None, device: torch.device | str) -> bool:
    """Resolve ``from_pretrained``'s ``kernels`` argument for ``device``."""
    if kernels is False:
        return False
    device = torch.device(device)
    if kernels is None and device.type != "cuda":
        return False
    reason = kernel_backend.unavailable_reason(device)
    if reason is None:
        return True
    if kernels:
        raise RuntimeError(f"from_pretrained(kernels=True) on {device}: {reason}; pass kernels=None to fall back "
                           "to the pure-torch path")
    logger.warning("GPU kernels not used, the compressed layers run on the pure-torch path: %s", reason)
    return False


def _fix(model) -> str:
    return f"the checkpoint does not fit the {type(model).__name__} that config.json describes; re-export it"


def _load_uncompressed(
    model, ckpt: CompressedCheckpoint, device: torch.device | str, dtype: torch.dtype | None
) -> None:
    """Assign the stored tensors, check them against the model, and tie the tied weights."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    tied = {target: source for target, source in model.all_tied_weights_keys.items() if target in expected}
    tensors = ckpt.load_tensors(device, dtype)
    for name, tensor in tensors.items():
        if name not in expected or name in tied:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: unexpected tensor '{name}' (the {type(model).__name__} built from "
                f"config.json has no such uncompressed parameter or buffer); {_fix(model)}"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{ckpt.file_of(name)}: '{name}' has shape {list(tensor.shape)}, the model expects "
                f"{list(expected[name].shape)}; {_fix(model)}"
            )
    missing = [n for n in expected if n not in tensors and n not in tied]
    if missing:
        raise CheckpointError(f"{ckpt.file_of(missing[0])}: tensor '{missing[0]}' is missing; {_fix(model)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    for target, source in tied.items():
        parent, _, attr = target.rpartition(".")
        setattr(model.get_submodule(parent), attr, model.get_parameter(source))


def _materialize_non_persistent_buffers(model, device: torch.device | str) -> None:
    """Recreate meta non-persistent buffers (e.g. rotary ``inv_freq``) on ``device`` and let the model's own
    initializer fill them."""
    owners = {}
    for name, buffer in model.named_non_persistent_buffers():
        if buffer.is_meta:
            parent, _, attr = name.rpartition(".")
            module = model.get_submodule(parent)
            module.register_buffer(attr, torch.empty_like(buffer, device=device), persistent=False)
            owners[parent] = module
    for module in owners.values():
        if any(True for _ in module.parameters(recurse=False)):
            raise CheckpointError(f"cannot recompute the buffers of {type(module).__name__}: it also has parameters")
        model._init_weights(module)
