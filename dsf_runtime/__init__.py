"""Runtime: packed sparse formats, the compressed-model directory, modules, kernels and the loader.

Importing it registers the ``"dsf"`` quantization method with transformers (``dsf_runtime.hf.register``), so that
``AutoModelForCausalLM.from_pretrained`` loads a compressed directory packed; that is the one thing done on import.
The Triton kernels are imported when a kernel layout first computes on a device where they run.
"""

from __future__ import annotations

from typing import Any

from dsf_runtime.checkpoint import CheckpointError, CompressedCheckpoint, open_compressed, save_compressed
from dsf_runtime.formats import LAYOUTS, FormatError, PackedMatrix, kernel_layout, pack, pack_factors
from dsf_runtime.layer import CompressedLayer
from dsf_runtime.modules import FactorizedLinear, SparseLinear, linear, replace_linear
from dsf_runtime.convert import use_kernels
from dsf_runtime.hf import register as _register_with_transformers

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "CompressedCheckpoint",
    "CompressedLayer",
    "FactorizedLinear",
    "FormatError",
    "PackedMatrix",
    "SparseLinear",
    "from_pretrained",
    "kernel_layout",
    "linear",
    "load_tokenizer",
    "open_compressed",
    "pack",
    "pack_factors",
    "replace_linear",
    "save_compressed",
    "use_kernels",
    "warmup",
]

_register_with_transformers()

_LAZY = {"from_pretrained", "load_tokenizer", "warmup"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dsf_runtime import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dsf_runtime' has no attribute {name!r}")
