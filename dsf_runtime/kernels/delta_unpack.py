"""Decompress a ``delta`` matrix into a dense ``[rows, cols]`` buffer: zero it, then scatter the non-zeros
(columns recovered with the same two-level prefix sums as ``delta_matmul``)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


__all__ = ["delta_unpack", "delta_unpack_reference"]


@triton.jit
def _delta_unpack_kernel(
    vals_ptr,  # [total] entry values
    idx_ptr,  # [total // 2] uint8 deltas, split halves per 32-entry chunk
    row_ptr_ptr,  # [rows + 1] int32 entry offsets
    out_ptr,  # [rows, >= cols] dense output (already zero), row stride stride_o
    rows,  # rows
    cols,  # columns; entries past cols are fillers and skipped
    stride_o,  # elements between rows of out
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_E: tl.constexpr,  # entries per row per loop step, a multiple of 32
):
    pid_r = tl.program_id(0)
    C: tl.constexpr = BLOCK_E // 32
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    start = tl.load(row_ptr_ptr + r, mask=r_ok, other=0)
    length = tl.load(row_ptr_ptr + r + 1, mask=r_ok, other=0) - start
    max_len = tl.max(length, axis=0)
    start = tl.multiple_of(start, 32)  # row offsets are multiples of 32 entries
    j = tl.arange(0, 16)[:, None, None]  # [16, 1, 1]: entry inside a half chunk
    chunk = tl.arange(0, C)[None, :, None]  # [1, C, 1]
    start3 = start[None, None, :]
    len3 = length[None, None, :]
    o_row = out_ptr + r.to(tl.int64)[None, None, :] * stride_o
    prev = tl.full([BLOCK_R], -1, tl.int32)
    for e0 in range(0, max_len, BLOCK_E):
        ok = e0 + chunk * 32 < len3
        byte = tl.load(idx_ptr + ((start3 + e0) // 2 + chunk * 16 + j), mask=ok, other=0)
        d_lo = (byte & 15).to(tl.int32) + 1
        d_hi = (byte >> 4).to(tl.int32) + 1
        tot_lo = tl.sum(d_lo, axis=0)
        tot = tot_lo + tl.sum(d_hi, axis=0)
        base = prev[None, :] + tl.cumsum(tot, axis=0) - tot
        col_lo = base[None, :, :] + tl.cumsum(d_lo, axis=0)
        col_hi = (base + tot_lo)[None, :, :] + tl.cumsum(d_hi, axis=0)
        prev += tl.sum(tot, axis=0)
        e = start3 + e0 + chunk * 32 + j
        v_lo = tl.load(vals_ptr + e, mask=ok, other=0.0)
        v_hi = tl.load(vals_ptr + e + 16, mask=ok, other=0.0)
        tl.store(o_row + col_lo, v_lo.to(out_ptr.dtype.element_ty), mask=ok & (v_lo != 0) & (col_lo < cols))
        tl.store(o_row + col_hi, v_hi.to(out_ptr.dtype.element_ty), mask=ok & (v_hi != 0) & (col_hi < cols))

def delta_unpack(w: Any, out: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                 row_start: int = 0, row_stop: int | None = None, block_r: int = 4, block_e: int = 128,
                 num_warps: int = 4) -> torch.Tensor:
    """Dense copy of rows ``row_start:row_stop`` of a ``delta`` matrix (arguments as ``nibble_unpack``; ``out``
    is zeroed here)."""
    if w.layout != "delta":
        raise ValueError(f"delta_unpack needs a 'delta' matrix, got layout {w.layout!r}")
    rows_all, cols = w.shape
    row_stop = rows_all if row_stop is None else row_stop
    if not 0 <= row_start <= row_stop <= rows_all:
        raise ValueError(f"row range {row_start}:{row_stop} is outside 0:{rows_all}")
    rows = row_stop - row_start
    if out is None:
        out = torch.zeros(rows, cols, dtype=dtype or w.dtype, device=w.device)
    elif out.shape != (rows, cols) or out.stride(1) != 1 or out.device != w.device:
        raise ValueError(f"out must be [{rows}, {cols}] on {w.device} with unit column stride, "
                         f"got {list(out.shape)} strides {out.stride()} on {out.device}")
    else:
        out.zero_()
    if rows == 0 or cols == 0:
        return out
    _delta_unpack_kernel[(triton.cdiv(rows, block_r),)](
        w.values, w.index, w.row_ptr[row_start:], out, rows, cols, out.stride(0),
        BLOCK_R=block_r, BLOCK_E=block_e, num_warps=num_warps)
    return out


def delta_unpack_reference(w: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch ``delta_unpack``."""
    return w.to_dense(dtype)
