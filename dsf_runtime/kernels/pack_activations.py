"""Pack activations for the ``BN > 1`` matmul kernels: ``[T, cols]`` → ``[ceil(T / BN), cols, BN]``.

The ``BN`` tokens of a chunk become contiguous per column, so a kernel gathers all of them for one column with a
single vector load; tokens past ``T`` are zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from dsf_runtime.kernels.configs import pdl_options

__all__ = ["pack_activations", "pack_activations_reference"]


@triton.jit
def _pack_activations_kernel(
    x_ptr,  # [T, cols] input rows, row stride stride_xt, unit column stride
    xp_ptr,  # [T_chunks, cols, BN] packed output
    n_tokens,  # T
    cols,  # columns of x
    stride_xt,  # elements between rows of x
    BN: tl.constexpr,  # tokens per chunk
    BLOCK_K: tl.constexpr,  # columns per program
    GDC: tl.constexpr,  # launched with programmatic dependent launch
):
    if GDC:
        gdc_wait()
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    b = tl.arange(0, BN)
    tok = pid_c * BN + b
    tile = tl.load(x_ptr + tok.to(tl.int64)[:, None] * stride_xt + k[None, :],
                   mask=(tok < n_tokens)[:, None] & (k < cols)[None, :], other=0.0)  # [BN, BLOCK_K]
    dst = xp_ptr + pid_c.to(tl.int64) * cols * BN + k[None, :] * BN + b[:, None]
    tl.store(dst, tile.to(xp_ptr.dtype.element_ty), mask=(k < cols)[None, :])
    if GDC:
        gdc_launch_dependents()


def pack_activations(x: torch.Tensor, BN: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[T, cols]`` (unit column stride) → contiguous ``[ceil(T / BN), cols, BN]`` in ``dtype`` (default
    ``x.dtype``; float32 spares the consuming kernel a conversion per gathered value), zero past ``T``."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, cols] with unit column stride, got shape {list(x.shape)} strides {x.stride()}")
    if BN < 1 or BN & (BN - 1):
        raise ValueError(f"BN must be a power of two, got {BN}")
    T, cols = x.shape
    chunks = triton.cdiv(T, BN)
    xp = torch.empty(chunks, cols, BN, dtype=dtype or x.dtype, device=x.device)
    BLOCK_K = 256 if BN <= 4 else 64
    if chunks and cols:
        _pack_activations_kernel[(chunks, triton.cdiv(cols, BLOCK_K))](
            x, xp, T, cols, x.stride(0), BN=BN, BLOCK_K=BLOCK_K, **pdl_options(x))
    return xp


def pack_activations_reference(x: torch.Tensor, BN: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch ``pack_activations``."""
    T, cols = x.shape
    chunks = -(-T // BN)
    xp = torch.zeros(chunks * BN, cols, dtype=dtype or x.dtype, device=x.device)
    xp[:T] = x
    return xp.view(chunks, BN, cols).transpose(1, 2).contiguous()
