"""Load a compressed model directory as a ready Hugging Face model whose compressed linears stay packed.

The model is built from ``config.json`` on the ``meta`` device, so no dense weight is ever allocated; compressed
layers become ``FactorizedLinear``/``SparseLinear`` modules whose buffers are read straight to the device, the
other tensors are read straight to the device and assigned, tied weights are re-tied and non-persistent buffers
(rotary frequencies) are recomputed. Nothing is downloaded.

This is the one place where layouts are converted for the GPU kernels. On CUDA (when Triton imports) each
compressed factor that is not already in a kernel layout (``nibble``/``delta``, read straight to the device as
stored) is converted right after it is read (``dsf_runtime.formats.kernel_layout``): the module keeps only that
representation and the stored copy is released before the next layer is read, so the peak is one layer above the
converted model. Without Triton the stored layouts stay and the pure-torch path runs (the reason is logged).
``use_kernels(model)`` converts a model loaded elsewhere; run ``warmup`` (or one eager forward per token count)
before capturing a CUDA graph; ``dsf_runtime.generation`` does this for generation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from dsf_runtime.checkpoint import CheckpointError, CompressedCheckpoint, open_compressed
from dsf_runtime.formats import kernel_layout
from dsf_runtime.kernels import unavailable_reason
from dsf_runtime.layer import CompressedLayer
from dsf_runtime.modules import FactorizedLinear, SparseLinear, replace_linear

__all__ = ["from_pretrained", "load_tokenizer", "use_kernels", "warmup"]

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
        kernels: run the compressed layers on the Triton kernels, converting factors that are not stored in a
            kernel layout at load time. None (default): on CUDA when the kernels can run there, else keep the
            stored layouts (logging why on CUDA); True: always (raises when they cannot run, e.g. on the CPU
            outside ``TRITON_INTERPRET=1``); False: never convert.

    Returns:
        A ``PreTrainedModel``; ``generate()`` works.

    Raises:
        CheckpointError: the directory is incomplete or a tensor is missing, unexpected or invalid.
        RuntimeError: ``kernels=True`` but the kernels cannot run on ``device``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    ckpt = open_compressed(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if getattr(config, "auto_map", None):
        raise CheckpointError(f"{directory / 'config.json'}: has an 'auto_map' (code shipped with the checkpoint); "
                              "dsf never runs a checkpoint's own Python code: remove 'auto_map' from config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    use = _use_kernels(kernels, device)
    for fqn in ckpt.layers:
        layer = ckpt.load_layer(fqn, device).to(dtype=dtype)
        replace_linear(model, {fqn: _kernel_layer(layer) if use else layer})
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

    return AutoTokenizer.from_pretrained(Path(directory), trust_remote_code=False)


def _use_kernels(kernels: bool | None, device: torch.device | str) -> bool:
    """Resolve ``from_pretrained``'s ``kernels`` argument for ``device``."""
    if kernels is False:
        return False
    device = torch.device(device)
    if kernels is None and device.type != "cuda":
        return False
    reason = unavailable_reason(device)
    if reason is None:
        return True
    if kernels:
        raise RuntimeError(f"from_pretrained(kernels=True) on {device}: {reason}; pass kernels=None to fall back "
                           "to the pure-torch path")
    logger.warning("GPU kernels not used, the compressed layers run on the pure-torch path: %s", reason)
    return False


def _kernel_layer(layer: CompressedLayer) -> CompressedLayer:
    """``layer`` with every factor in the GPU kernels' layout with the fewest bytes (stored kernel layouts kept)."""
    return dataclasses.replace(layer, factors={k: kernel_layout(f) for k, f in layer.factors.items()})


def _compressed_modules(model: nn.Module) -> list[tuple[str, FactorizedLinear | SparseLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, SparseLinear))]


def use_kernels(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Convert, in place, every compressed module of ``model`` whose factors are not all in a kernel layout
    (values cast to ``dtype``, default their own). Each module then holds only the kernel layouts. Returns the number
    of modules converted.

    Raises:
        RuntimeError: the kernels cannot run where the model's weights are (``unavailable_reason``).
    """
    converted = 0
    for name, module in _compressed_modules(model):
        factors = module.factors()
        reason = unavailable_reason(factors[0].device)
        if reason:
            raise RuntimeError(f"cannot convert '{name}' for the kernels: {reason}; keep the stored layouts "
                               "(pure-torch path) or move the model to a CUDA device first")
        new = [kernel_layout(f, dtype) for f in factors]
        if any(n is not f for n, f in zip(new, factors)):
            module.set_factors(new)
            converted += 1
    return converted


@torch.inference_mode()
def warmup(model: nn.Module, tokens: tuple[int, ...] = (1,), dtype: torch.dtype | None = None) -> int:
    """Run one forward per distinct compressed-layer signature (layouts, shapes, dtypes) and token count, so that
    the Triton kernels are compiled before a CUDA graph captures these token counts. Returns the number of
    forwards run.

    Args:
        model: a model whose compressed modules run on the kernels (``from_pretrained`` on CUDA, ``use_kernels``).
        tokens: token counts (batch × new tokens per step) the model will run with.
        dtype: activation dtype (default: each layer's value dtype).
    """
    seen, runs = set(), 0
    for _, module in _compressed_modules(model):
        factors = module.factors()
        if not all(f.kernel_ready(f.device) for f in factors):
            continue
        signature = (type(module), module.bias is not None,
                     *[(type(f), f.shape, f.dtype, tuple(f.values.shape), *(getattr(f, o) for o in f.options))
                       for f in factors])
        if signature in seen:
            continue
        seen.add(signature)
        for t in tokens:
            module(torch.zeros(t, module.in_features, dtype=dtype or factors[0].dtype, device=factors[0].device))
            runs += 1
    return runs


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
