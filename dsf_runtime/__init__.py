"""Runtime: packed sparse formats, the compressed-model directory, modules, kernels and the loader.

``from_pretrained`` and ``load_tokenizer`` import ``transformers`` on first use; the rest needs only torch and
safetensors.
"""

from __future__ import annotations

from typing import Any

from dsf_runtime.checkpoint import CheckpointError, CompressedCheckpoint, open_compressed, save_compressed
from dsf_runtime.formats import LAYOUTS, FormatError, PackedMatrix, pack, pack_factors
from dsf_runtime.layer import CompressedLayer
from dsf_runtime.modules import FactorizedLinear, SparseLinear, replace_linear
from dsf_runtime.ops import packed_matmul, register_kernel

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
    "load_tokenizer",
    "open_compressed",
    "pack",
    "pack_factors",
    "packed_matmul",
    "register_kernel",
    "replace_linear",
    "save_compressed",
]

_LAZY = {"from_pretrained", "load_tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dsf_runtime import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dsf_runtime' has no attribute {name!r}")
