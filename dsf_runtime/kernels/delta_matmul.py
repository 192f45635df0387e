"""Decode matmul over the unstructured ``delta`` layout (4-bit column deltas, MACKO-style).

``y[t, i] = Σ_e values[e] · x[t, col(e)]`` over the entries ``e`` of row ``i``; columns are recovered with two
prefix sums per loop step (inside each 16-entry half chunk, then across chunks), carried from step to step.
Activations and outputs use the same conventions as ``nibble_matmul`` (``BN == 1``: rows of ``x``; ``BN > 1``:
packed ``[T_chunks, cols, BN]``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from dsf_runtime.kernels._io import plan_launch
from dsf_runtime.kernels.configs import pdl_options

__all__ = ["delta_matmul", "delta_matmul_reference"]


@triton.jit
def _delta_matmul_kernel(
    x_ptr,  # activations: element (chunk c, column k, lane b) at x_ptr + c*stride_xc + k*BN + b
    vals_ptr,  # [total] entry values
    idx_ptr,  # [total // 2] uint8 deltas, split halves per 32-entry chunk
    row_ptr_ptr,  # [rows + 1] int32 entry offsets (multiples of 32)
    bias_ptr,  # [rows] bias (read only when HAS_BIAS)
    y_ptr,  # output: element (chunk c, lane b, row i) at y_ptr + c*stride_yc + b*stride_yb + i*stride_yi
    rows,  # rows (outputs)
    cols,  # columns (inputs); gathers are clamped to cols - 1 (zero-valued fillers)
    n_tokens,  # lanes with c*BN + b >= n_tokens are not stored (T, or all lanes of a packed output)
    stride_xc,  # elements between token chunks of x
    stride_yc,  # elements between token chunks of y
    stride_yb,  # elements between lanes of y
    stride_yi,  # elements between rows of y
    BN: tl.constexpr,  # tokens per program
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_E: tl.constexpr,  # entries per row per loop step, a multiple of 32
    HAS_BIAS: tl.constexpr,  # add bias
    GDC: tl.constexpr,  # launched with programmatic dependent launch (griddepcontrol wait / launch_dependents)
):
    # Tiles are [16, C, rows]: entry-in-half-chunk on axis 0 so the contiguous index/value loads and the x gathers
    # share one register layout (no layout conversion inside the loop).
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    C: tl.constexpr = BLOCK_E // 32
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    start = tl.load(row_ptr_ptr + r, mask=r_ok, other=0)
    length = tl.load(row_ptr_ptr + r + 1, mask=r_ok, other=0) - start
    max_len = tl.max(length, axis=0)
    start = tl.multiple_of(start, 32)  # row offsets are multiples of 32 entries
    j = tl.arange(0, 16)[:, None, None]  # [16, 1, 1]
    chunk = tl.arange(0, C)[None, :, None]  # [1, C, 1]
    start3 = start[None, None, :]
    len3 = length[None, None, :]
    x_base = x_ptr + pid_c.to(tl.int64) * stride_xc
    prev = tl.full([BLOCK_R], -1, tl.int32)  # column of the last entry consumed, per row
    if BN == 1:
        acc = tl.zeros([16, C, BLOCK_R], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, BN], dtype=tl.float32)
    if GDC:
        gdc_wait()
    for e0 in range(0, max_len, BLOCK_E):
        ok = e0 + chunk * 32 < len3  # [1, C, R]
        byte = tl.load(idx_ptr + ((start3 + e0) // 2 + chunk * 16 + j), mask=ok, other=0)  # [16, C, R]
        d_lo = (byte & 15).to(tl.int32) + 1
        d_hi = (byte >> 4).to(tl.int32) + 1
        tot_lo = tl.sum(d_lo, axis=0)  # [C, R]
        tot = tot_lo + tl.sum(d_hi, axis=0)
        base = prev[None, :] + tl.cumsum(tot, axis=0) - tot  # column before each chunk, [C, R]
        col_lo = tl.minimum(base[None, :, :] + tl.cumsum(d_lo, axis=0), cols - 1)
        col_hi = tl.minimum((base + tot_lo)[None, :, :] + tl.cumsum(d_hi, axis=0), cols - 1)
        prev += tl.sum(tot, axis=0)
        e = start3 + e0 + chunk * 32 + j
        v_lo = tl.load(vals_ptr + e, mask=ok, other=0.0).to(tl.float32)
        v_hi = tl.load(vals_ptr + e + 16, mask=ok, other=0.0).to(tl.float32)
        if BN == 1:
            acc += v_lo * tl.load(x_base + col_lo).to(tl.float32) + v_hi * tl.load(x_base + col_hi).to(tl.float32)
        else:
            lane = tl.arange(0, BN)[None, None, None, :]
            x_lo = tl.load(x_base + col_lo[:, :, :, None] * BN + lane).to(tl.float32)
            x_hi = tl.load(x_base + col_hi[:, :, :, None] * BN + lane).to(tl.float32)
            prod = v_lo[:, :, :, None] * x_lo + v_hi[:, :, :, None] * x_hi
            acc += tl.sum(tl.sum(prod, axis=0), axis=0)
    if GDC:
        gdc_launch_dependents()
    if BN == 1:
        out = tl.sum(tl.sum(acc, axis=0), axis=0)[:, None]
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    lane = tl.arange(0, BN)[None, :]
    y_ptrs = y_ptr + pid_c.to(tl.int64) * stride_yc + lane * stride_yb + r[:, None] * stride_yi
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & (pid_c * BN + lane < n_tokens))

def delta_matmul(
    x: torch.Tensor,
    w: Any,
    bias: torch.Tensor | None = None,
    *,
    n_tokens: int | None = None,
    out_dtype: torch.dtype | None = None,
    packed_out: int = 0,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x · Wᵀ (+ bias)`` for a ``delta`` matrix; arguments and result as ``nibble_matmul``."""
    L = plan_launch("delta", x, w, bias, n_tokens=n_tokens, out_dtype=out_dtype, packed_out=packed_out,
                    config=config, out=out)
    rows, cols = w.shape
    cfg = L.cfg
    if L.chunks == 0 or rows == 0:
        return L.y.zero_()
    grid = (L.chunks, triton.cdiv(rows, cfg["BLOCK_R"]))
    _delta_matmul_kernel[grid](
        L.x, w.values, w.index, w.row_ptr, bias if bias is not None else w.values, L.y,
        rows, cols, L.store_tokens, L.x.stride(0), *L.y_strides,
        BN=cfg["BN"], BLOCK_R=cfg["BLOCK_R"], BLOCK_E=cfg["BLOCK_S"], HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_options(L.x),
    )
    return L.y


def delta_matmul_reference(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None,
                           *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Plain-torch ``x · Wᵀ + bias`` computed in ``dtype``."""
    y = x.to(dtype) @ w.to_dense(dtype).t()
    return y if bias is None else y + bias.to(dtype)
