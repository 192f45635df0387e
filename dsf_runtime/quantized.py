"""Dense tensors stored as int8 with one scale per row (docs/format.md, "Quantized tensors"): the input embedding,
which the output layer shares when they are tied.

A quantized tensor ``<name>`` is stored as ``<name>`` int8 ``[rows, cols]`` plus ``<name>_scale`` ``[rows]`` in a
floating dtype; element ``(i, j)`` is ``<name>[i, j] · <name>_scale[i]``. Writers quantize with
``compress.quantize.quantize_embedding`` (symmetric int8, round to nearest); this module decodes and checks.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FORMAT", "SCALE_SUFFIX", "check_quantized", "dequantize_rows", "input_embedding_name"]

FORMAT = "int8-row"  # the manifest's name of this encoding
SCALE_SUFFIX = "_scale"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``q · scale[:, None]`` (``[rows, cols]``) in ``dtype`` (default: the scale's), computed in fp32."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype or scale.dtype)


def check_quantized(name: str, q: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why tensor ``name`` (``q``) and its scale are not a valid quantized pair, or None (dtypes and shapes only:
    the header is enough to check them)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        return f"'{name}' is {q.dtype} {list(q.shape)}, expected int8 [rows, cols]"
    if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) != (q.shape[0],):
        return (f"'{name}{SCALE_SUFFIX}' is {scale.dtype} {list(scale.shape)}, expected float16, bfloat16 or "
                f"float32 [{q.shape[0]}]")
    return None


def input_embedding_name(model: nn.Module) -> str | None:
    """State-dict name of ``model``'s input embedding matrix (``model.embed_tokens.weight`` for Llama), or None."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if module is embedding and embedding is not None:
            return f"{name}.weight"
    return None
