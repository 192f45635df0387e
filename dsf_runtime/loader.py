"""Load a compressed model directory as a ready Hugging Face model whose compressed linears stay packed.

The model is built from ``config.json`` on the ``meta`` device, so no dense weight is ever allocated; compressed
layers become ``FactorizedLinear``/``SparseLinear`` modules whose buffers are read straight to the device, the
other tensors are read straight to the device and assigned, tied weights are re-tied and non-persistent buffers
(rotary frequencies) are recomputed. Nothing is downloaded.

Layouts are converted for the GPU kernels at load time (``dsf_runtime.convert``). On CUDA (when Triton imports) each
compressed factor that is not already in a kernel layout (``nibble``/``delta``, read straight to the device as
stored) is converted right after it is read (``dsf_runtime.formats.kernel_layout``): the module keeps only that
representation and the stored copy is released before the next layer is read, so the peak is one layer above the
converted model. Without Triton the stored layouts stay and the pure-torch path runs (the reason is logged).
``use_kernels(model)`` converts a model loaded elsewhere; run ``warmup`` (or one eager forward per token count)
before capturing a CUDA graph; ``dsf_runtime.generation`` does this for generation.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsf_runtime.checkpoint import (
    MANIFEST_NAME,
    QUANT_METHOD,
    CheckpointError,
    CompressedCheckpoint,
    open_compressed,
    quantization_config,
    read_json,
)
from dsf_runtime.convert import compressed_modules, finish_loading, kernel_layer, use_kernels
from dsf_runtime.hf import attach
from dsf_runtime.kernels import unavailable_reason
from dsf_runtime.layer import FACTOR_NAMES
from dsf_runtime.modules import int8_embedding_on_meta, replace_linear
from dsf_runtime.quantized import SCALE_SUFFIX

__all__ = ["check_config", "from_pretrained", "load_tokenizer", "use_kernels", "warmup"]

logger = logging.getLogger(__name__)

# config.json fields that must be positive integers when present.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "max_position_embeddings", "head_dim")
_MAX_SIZE = 2**31 - 1  # above any real model, below what a tensor extent overflows at
_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
# The first numbered component of a tensor name is its decoder layer ("model.layers.3.mlp..." -> 3).
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def from_pretrained(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    kernels: bool | None = None,
    allow_nonfinite: bool = False,
    float32_on_cpu: bool = True,
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
        allow_nonfinite: load NaN/Inf weights instead of raising (``open_compressed``).
        float32_on_cpu: 16-bit weights compute in fp32 when the model runs on the CPU
            (``convert.float32_activations_on_cpu``); False keeps one dtype throughout (an ONNX export). An int8
            input embedding (docs/format.md, "Quantized tensors") stays int8 on the CPU and is dequantized on CUDA
            (``convert.finish_loading``).

    Returns:
        A ``PreTrainedModel``; ``generate()`` works.

    Raises:
        CheckpointError: the directory is incomplete, config.json is not sane (naming the field) or disagrees
            with the manifest, or a tensor is missing, unexpected, invalid or non-finite.
        RuntimeError: ``kernels=True`` but the kernels cannot run on ``device``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GenerationConfig

    directory = Path(directory)
    with open_compressed(directory, allow_nonfinite=allow_nonfinite) as ckpt:
        config = check_config(directory, ckpt)
        model = _build_model(directory / "config.json", config, ckpt)
        use = _use_kernels(kernels, device)
        for fqn in ckpt.layers:
            layer = ckpt.load_layer(fqn, device).to(dtype=dtype)
            replace_linear(model, {fqn: kernel_layer(layer) if use else layer})
        _load_uncompressed(model, ckpt, device, dtype)
    _materialize_non_persistent_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{directory}: no data for {left[:5]} after loading; {_fix(model)}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if dtype is not None:
        model.config.dtype = dtype
    return attach(finish_loading(model, float32_on_cpu=float32_on_cpu).eval(), ckpt.manifest)


def _config_error(path: Path, field: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"{path}: '{field}' is {value!r}, expected {expected}; fix config.json or re-export the "
                           "checkpoint")


def _check_sizes(path: Path, config: dict[str, Any]) -> None:
    """Positive integer sizes up to ``_MAX_SIZE``, heads dividing ``hidden_size`` and each other, positive
    epsilons, ``pad_token_id`` inside the vocabulary; fields absent from ``config`` (or None) are not checked."""
    for name in _POSITIVE_SIZES:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE):
            raise _config_error(path, name, value, f"a positive integer <= {_MAX_SIZE}")
    hidden, heads, kv = config.get("hidden_size"), config.get("num_attention_heads"), config.get("num_key_value_heads")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise _config_error(path, "num_attention_heads", heads, f"a divisor of hidden_size {hidden}")
    if heads and kv and heads % kv:
        raise _config_error(path, "num_key_value_heads", kv, f"a divisor of num_attention_heads {heads}")
    for name in _EPS_FIELDS:
        value = config.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 < value < math.inf):
            raise _config_error(path, name, value, "a finite number > 0")
    pad, vocab = config.get("pad_token_id"), config.get("vocab_size")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < (vocab or 0)):
        raise _config_error(path, "pad_token_id", pad, f"null or a token id in [0, vocab_size {vocab})")


def _read_config(path: Path) -> None:
    """Check the raw ``config.json``: parsed within the JSON limits, no ``auto_map``, a ``model_type`` that
    transformers knows and sane values for the fields it has (``_check_sizes``)."""
    from transformers import CONFIG_MAPPING

    config = read_json(path, fix="fix config.json or re-export the checkpoint")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: is a JSON {type(config).__name__}, expected an object; re-export the "
                              "checkpoint")
    if config.get("auto_map"):
        raise CheckpointError(f"{path}: has an 'auto_map' (code shipped with the checkpoint); dsf never runs a "
                              "checkpoint's own Python code: remove 'auto_map' from config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise _config_error(path, "model_type", model_type, "a model type this transformers version knows")
    _check_sizes(path, config)


def _auto_config(directory: Path):
    """``AutoConfig`` of ``directory`` (no remote code); transformers' own refusal becomes a CheckpointError naming
    config.json."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        message = str(exc).replace("\n", " ")
        raise CheckpointError(f"{directory / 'config.json'}: transformers refuses it ({message}); fix config.json or "
                              "re-export the checkpoint") from exc


def check_config(directory: Path, ckpt: CompressedCheckpoint):
    """The ``transformers`` config of ``directory``, checked before any model is built: ``_read_config`` on the
    raw ``config.json``, the same size checks on the parsed config (whose attribute maps resolve names such as
    GPT-2's ``n_layer``), and ``num_hidden_layers`` equal to the number of layers the checkpoint's tensor names
    are numbered for.

    Raises:
        CheckpointError: naming config.json and the field.
    """
    path = directory / "config.json"
    _read_config(path)
    config = _auto_config(directory)
    fields = (*_POSITIVE_SIZES, *_EPS_FIELDS, "pad_token_id")
    _check_sizes(path, {name: getattr(config, name, None) for name in fields})
    _check_quantization_config(path, getattr(config, "quantization_config", None), ckpt)
    indices = [int(m.group(1)) for name in ckpt.weight_map if (m := _LAYER_INDEX.search(name))]
    layers = max(indices) + 1 if indices else 0
    if getattr(config, "num_hidden_layers", None) != layers:
        raise _config_error(path, "num_hidden_layers", getattr(config, "num_hidden_layers", None),
                            f"{layers} (the layers the checkpoint's tensors are numbered for)")
    return config


def _check_quantization_config(path: Path, found: Any, ckpt: CompressedCheckpoint) -> None:
    """``config.json``'s ``quantization_config``, when present, must be the one ``save_compressed`` writes for the
    manifest (older directories have none).

    Raises:
        CheckpointError: naming config.json, the field, and both values.
    """
    if found is None:
        return
    found = found.to_dict() if hasattr(found, "to_dict") else found
    expected = quantization_config(ckpt.manifest)
    if not isinstance(found, dict) or found.get("quant_method") != QUANT_METHOD:
        method = found.get("quant_method") if isinstance(found, dict) else found
        raise _config_error(path, "quantization_config.quant_method", method, f"{QUANT_METHOD!r} in a dsf directory")
    for key, value in expected.items():
        if found.get(key) != value:
            raise _config_error(path, f"quantization_config.{key}", found.get(key),
                                f"{value!r} (what {ckpt.directory / MANIFEST_NAME} and the tensors hold)")


def _build_model(path: Path, config, ckpt: CompressedCheckpoint):
    """The causal LM of ``config`` on the meta device, after checking that every compressed layer of the manifest
    is of a linear kind and names a Linear of the model with the layer's shape.

    Raises:
        CheckpointError: naming config.json (no causal LM for its ``model_type``) or the manifest's layer.
    """
    from transformers import AutoModelForCausalLM

    for fqn, entry in ckpt.layers.items():
        if entry["kind"] not in FACTOR_NAMES:
            raise ckpt.layer_error(fqn, f"has kind {entry['kind']!r}; from_pretrained loads the linear kinds "
                                        f"{sorted(FACTOR_NAMES)} only (load convolutions with dsf_runtime.conv)")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise _config_error(path, "model_type", config.model_type, f"a causal LM type ({exc})") from exc
    modules = dict(model.named_modules())
    for fqn, entry in ckpt.layers.items():
        module = modules.get(fqn)
        if not isinstance(module, nn.Linear) or [module.out_features, module.in_features] != entry["shape"]:
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ckpt.layer_error(
                fqn, f"is not a Linear {entry['shape']} of the {type(model).__name__} that config.json describes "
                     f"(model_type {config.model_type!r}: {found})"
            )
    return model


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
    for _, module in compressed_modules(model):
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
            module(torch.zeros(t, module.in_features, dtype=dtype or factors[0].compute_dtype,
                               device=factors[0].device))
            runs += 1
    return runs


def _fix(model) -> str:
    return f"the checkpoint does not fit the {type(model).__name__} that config.json describes; re-export it"


def _load_uncompressed(
    model, ckpt: CompressedCheckpoint, device: torch.device | str, dtype: torch.dtype | None
) -> None:
    """Assign the stored tensors, check them against the model, and tie the tied weights."""
    for name in ckpt.quantized:
        try:
            int8_embedding_on_meta(model, name, dtype or ckpt.tensor_dtype(name + SCALE_SUFFIX))
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(f"{ckpt.file_of(name)}: {exc}; {_fix(model)}") from exc
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
