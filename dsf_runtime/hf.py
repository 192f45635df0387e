"""The transformers side of a compressed directory: its ``quantization_config``, a quantizer registered with
transformers, and ``save_pretrained``.

``config.json`` of a compressed directory carries ``{"quant_method": "dsf", ...}``
(``dsf_runtime.checkpoint.quantization_config``). ``register()``, which ``import dsf_runtime`` calls, adds
``DsfConfig`` and ``DsfQuantizer`` to transformers' registries (``register_quantization_config`` /
``register_quantizer``), so that::

    import dsf_runtime
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("x")      # the linears stay packed
    model.save_pretrained("y")                             # a compressed directory again

The quantizer swaps each compressed ``nn.Linear`` for a ``FactorizedLinear``/``SparseLinear`` whose tensors are
``meta`` tensors of the stored shapes and dtypes (read from the file headers), lets transformers fill them from the
files, then validates every factor (indices, counts, finite values) as ``dsf_runtime.from_pretrained`` does and,
on CUDA where the Triton kernels run, converts the factors to the kernels' layouts. Both loaders end in ``attach``:
the model's ``save_pretrained`` then writes a compressed directory through ``save_compressed`` (atomic, manifest
last), and transformers' own writer, which would drop the manifest, refuses the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from dsf_runtime.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANT_METHOD,
    CheckpointError,
    all_finite,
    open_compressed,
    save_compressed,
)
from dsf_runtime.convert import compressed_modules, finish_loading, use_kernels
from dsf_runtime.formats import FormatError, check_meta
from dsf_runtime.kernels import unavailable_reason
from dsf_runtime.layer import CompressedLayer
from dsf_runtime.modules import FactorizedLinear, int8_embedding_on_meta, replace_linear
from dsf_runtime.quantized import SCALE_SUFFIX

__all__ = ["DsfConfig", "DsfQuantizer", "attach", "register", "save_pretrained"]

logger = logging.getLogger(__name__)


class DsfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed directory (what ``checkpoint.quantization_config`` writes).

    Args:
        format, format_version: the directory format (``dsf-compressed``, 1).
        layouts: the factor layouts stored. value_dtypes: the factor value dtypes stored.
    """

    def __init__(
        self,
        format: str = FORMAT_NAME,
        format_version: int = FORMAT_VERSION,
        layouts: list[str] | None = None,
        value_dtypes: list[str] | None = None,
        quant_method: str = QUANT_METHOD,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"DsfConfig has quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.layouts = list(layouts or [])
        self.value_dtypes = list(value_dtypes or [])


class DsfQuantizer(HfQuantizer):
    """Loads a compressed directory through ``transformers``' ``from_pretrained`` with its linears packed.

    Only pre-compressed directories: compressing needs calibration data (``dsf compress``).
    """

    requires_calibration = True

    def __init__(self, quantization_config: DsfConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError("quantization_config=DsfConfig() cannot compress a dense model while loading: DSF needs "
                             "calibration data. Run `dsf compress --model DIR --output OUT`, then "
                             "from_pretrained(OUT)")
        super().__init__(quantization_config, **kwargs)
        self._manifest: dict[str, Any] | None = None

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        """Refuse a ``device_map`` that splits the model or offloads it: the factors load whole onto one device."""
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise ValueError(f"a dsf directory loads onto one device; got device_map with {set(device_map.values())}. "
                             "Pass device_map='cpu' or 'cuda:0' (or none)")
        if isinstance(device_map, dict) and {"disk", "meta"} & {str(d) for d in device_map.values()}:
            raise ValueError("a dsf directory cannot be offloaded to disk; pass device_map='cpu' or 'cuda:0'")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any) -> None:
        """Swap each compressed ``nn.Linear`` for its module over ``meta`` tensors of the stored shapes."""
        if not checkpoint_files:
            raise CheckpointError("a dsf quantization_config needs the directory's safetensors files; load a "
                                  "directory written by dsf (dsf compress / dsf export / save_pretrained)")
        directory = Path(checkpoint_files[0]).parent
        with open_compressed(directory) as ckpt:
            self._manifest = ckpt.manifest
            layers = {fqn: ckpt.layer_skeleton(fqn) for fqn in ckpt.layers}
            int8 = {name: ckpt.tensor_dtype(name + SCALE_SUFFIX) for name in ckpt.quantized}
        try:
            replace_linear(model, layers)
            for name, scale_dtype in int8.items():
                int8_embedding_on_meta(model, name, scale_dtype)
        except ValueError as exc:
            raise CheckpointError(f"{directory / MANIFEST_NAME}: {exc}; the checkpoint does not fit the "
                                  f"{type(model).__name__} that config.json describes; re-export it") from exc

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Validate every factor as loaded, freeze the values, run on the kernels where they run, ``attach``."""
        records = self._manifest["layers"]
        for name, module in compressed_modules(model):
            for key, factor in zip(module._factors, module.factors()):
                if factor.values.is_meta:
                    raise CheckpointError(f"'{name}.{key}.values' was not loaded; re-export the checkpoint")
                try:
                    factor.validate(f"{name}.{key}")
                    check_meta(factor, f"{name}.{key}", records[name]["factors"][key])
                except FormatError as exc:
                    raise CheckpointError(str(exc)) from exc
                if factor.values.is_floating_point() and not all_finite(factor.values):
                    raise CheckpointError(f"'{name}.{key}.values' holds NaN or Inf values; re-export the checkpoint "
                                          "from finite weights")
        device = next(model.parameters()).device
        if device.type == "cuda" and unavailable_reason(device) is None:
            use_kernels(model)
        attach(finish_loading(model), self._manifest)
        return model

    def is_serializable(self) -> bool:
        """transformers' own ``save_pretrained`` would write the tensors without ``dsf_manifest.json``; the model's
        ``save_pretrained`` (set by ``attach``) is the writer."""
        logger.warning("a dsf model is saved by its own save_pretrained (dsf_runtime.hf.save_pretrained), which "
                       "writes a compressed directory; call model.save_pretrained(directory)")
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def attach(model: nn.Module, manifest: dict[str, Any] | None) -> nn.Module:
    """Mark ``model`` (a compressed model from either loader) as dsf-quantized for transformers and give it a
    ``save_pretrained`` that writes a compressed directory, keeping ``manifest``'s layer records (method, errors,
    extra fields) and provenance. Returns ``model``."""
    model.hf_quantizer = DsfQuantizer(DsfConfig(**_config_fields(model.config)), pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for param in model.parameters():
        param.requires_grad_(False)
    model._dsf_manifest = manifest or {}
    model.save_pretrained = types.MethodType(save_pretrained, model)
    return model


def _config_fields(config: Any) -> dict[str, Any]:
    found = getattr(config, "quantization_config", None)
    found = found.to_dict() if hasattr(found, "to_dict") else dict(found or {})
    return {k: v for k, v in found.items() if k in ("format", "format_version", "layouts", "value_dtypes")}


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    is_main_process: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    safe_serialization: bool = True,
    **kwargs: Any,
) -> None:
    """Write ``model`` (loaded from a compressed directory) as a compressed directory that both loaders read.

    The factors are stored in the layouts they have in memory (a model converted for the GPU kernels is stored in
    ``nibble``/``delta``), the other tensors as they are, ``config.json`` from ``model.config`` (with a fresh
    ``quantization_config``) and ``generation_config.json``. The tokenizer is not saved (as with transformers:
    ``tokenizer.save_pretrained``).

    Args:
        model: a model returned by ``dsf_runtime.from_pretrained`` or transformers' ``from_pretrained`` of a
            compressed directory.
        save_directory: the output directory.
        is_main_process: write nothing when False (distributed runs).
        max_shard_size: bytes (int) or a size such as ``"2GB"``; above it the tensors go to shards plus an index.
        safe_serialization: must be True (safetensors is the only format).

    Raises:
        ValueError: an argument dsf cannot honour (``state_dict=``, ``push_to_hub=``, pickle serialization),
            naming the fix.
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("dsf save_pretrained does not push to a hub; save to a directory and upload it with "
                         "huggingface_hub.upload_folder")
    if kwargs.get("state_dict") is not None:
        raise ValueError("dsf save_pretrained writes the model's own packed tensors; a state_dict= cannot be "
                         "stored as a compressed directory. Load it into the model, then save without state_dict")
    if not safe_serialization:
        raise ValueError("dsf directories are safetensors only; drop safe_serialization=False")
    unknown = sorted(k for k, v in kwargs.items() if k not in ("push_to_hub", "state_dict") and v is not None)
    if unknown:
        raise TypeError(f"dsf save_pretrained got unsupported arguments {unknown}")
    if not is_main_process:
        return
    from transformers.utils.hub import convert_file_size_to_int

    manifest = getattr(model, "_dsf_manifest", {})
    records = manifest.get("layers", {})
    layers = {}
    for name, module in compressed_modules(model):
        record = records.get(name, {})
        kind = "dsf" if isinstance(module, FactorizedLinear) else "single"
        factors = dict(zip(module._factors, (dataclasses.replace(f) for f in module.factors())))
        extra = {k: v for k, v in record.items() if k not in _LAYER_FIELDS}
        layers[name] = CompressedLayer(kind, (module.out_features, module.in_features), factors,
                                       record.get("method", "unknown"), module.bias, record.get("error"),
                                       record.get("relative_error"), None, extra)
    owned = {f"{name}." for name in layers}
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(owned))}
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    info = {key: manifest.get(key) for key in ("base_model", "compression")}
    info["architecture"] = type(model).__name__
    generation = getattr(model, "generation_config", None)
    files = {} if generation is None else {"generation_config.json": generation.to_json_string().encode()}
    if isinstance(max_shard_size, str):
        max_shard_size = convert_file_size_to_int(max_shard_size)
    save_compressed(save_directory, tensors=tensors, layers=layers, config_source=config, info=info,
                    max_shard_bytes=max_shard_size, files=files)


# Manifest layer fields that CompressedLayer sets itself (the rest is kept as ``extra``).
_LAYER_FIELDS = ("kind", "method", "shape", "inner_dim", "nnz", "density", "bias", "error", "relative_error",
                 "factors")


def register() -> None:
    """Add ``DsfConfig`` and ``DsfQuantizer`` to transformers' quantization registries under ``"dsf"`` (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DsfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DsfQuantizer)
