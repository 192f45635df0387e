"""Decompress a ``nibble`` matrix (or a range of its rows) into a dense buffer; the prefill path feeds it to cuBLAS.

Each program writes a dense ``BLOCK_R × BLOCK_G·G`` tile, zeros included, in one coalesced pass (no memset, no
scattered stores): for each of the group's ``N`` slots (unrolled) it selects the slot's value into the column its
nibble names. Zero-valued (padding) slots never overwrite.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


__all__ = ["nibble_unpack", "nibble_unpack_reference"]


@triton.jit
def _nibble_unpack_kernel(
    vals_ptr,  # [>= rows, S] stored values, starting at the first row to unpack
    nib_ptr,  # [>= rows, S2] uint8 in-group columns, split halves per 32-slot chunk
    out_ptr,  # [rows, >= cols] dense output, row stride stride_o, unit column stride
    rows,  # rows to write
    cols,  # columns to write
    S,  # slots per row
    S2,  # index bytes per row (S // 2)
    ngroups,  # ceil(cols / G)
    stride_o,  # elements between rows of out
    G: tl.constexpr,  # group width
    N: tl.constexpr,  # slots per group
    GP: tl.constexpr,  # next power of two >= G
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_G: tl.constexpr,  # groups per program
):
    pid_g = tl.program_id(0)
    pid_r = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GP)
    ok = (r < rows)[:, None] & (g < ngroups)[None, :]  # [R, BG]
    r64 = r.to(tl.int64)[:, None]
    dense = tl.zeros([BLOCK_R, BLOCK_G, GP], dtype=out_ptr.dtype.element_ty)
    for j in tl.static_range(N):
        slot = g * N + j  # [BG]
        byte_off = (slot // 32) * 16 + slot % 16
        shift = ((slot % 32) >= 16).to(tl.uint8) * 4
        v = tl.load(vals_ptr + r64 * S + slot[None, :], mask=ok, other=0.0).to(out_ptr.dtype.element_ty)
        byte = tl.load(nib_ptr + r64 * S2 + byte_off[None, :], mask=ok, other=0)
        nib = ((byte >> shift[None, :]) & 15).to(tl.int32)
        hit = (nib[:, :, None] == c[None, None, :]) & (v != 0)[:, :, None]
        dense = tl.where(hit, v[:, :, None], dense)
    col = g[None, :, None] * G + c[None, None, :]
    keep = (c < G)[None, None, :] & (col < cols) & (r < rows)[:, None, None]
    tl.store(out_ptr + r.to(tl.int64)[:, None, None] * stride_o + col, dense, mask=keep)


def nibble_unpack(w: Any, out: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                  row_start: int = 0, row_stop: int | None = None, block_r: int = 4, block_g: int = 16,
                  num_warps: int = 4) -> torch.Tensor:
    """Dense copy of rows ``row_start:row_stop`` (default all) of a ``nibble`` matrix: the stored values, i.e. for
    int8 codes the codes themselves (the caller multiplies by ``w.scales``; ``dispatch`` does).

    Args:
        w: the matrix.
        out: optional destination ``[row_stop - row_start, cols]`` (unit column stride, any row stride).
        dtype: dtype of a new output (default ``w.compute_dtype``); ignored when ``out`` is given.

    Returns:
        ``out`` or a new tensor.
    """
    if w.layout != "nibble":
        raise ValueError(f"nibble_unpack needs a 'nibble' matrix, got layout {w.layout!r}")
    rows_all, cols = w.shape
    row_stop = rows_all if row_stop is None else row_stop
    if not 0 <= row_start <= row_stop <= rows_all:
        raise ValueError(f"row range {row_start}:{row_stop} is outside 0:{rows_all}")
    rows = row_stop - row_start
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype or w.compute_dtype, device=w.device)
    elif out.shape != (rows, cols) or out.stride(1) != 1 or out.device != w.device:
        raise ValueError(f"out must be [{rows}, {cols}] on {w.device} with unit column stride, "
                         f"got {list(out.shape)} strides {out.stride()} on {out.device}")
    if rows == 0 or cols == 0:
        return out
    ngroups = triton.cdiv(cols, w.group)
    S = w.values.shape[1]
    grid = (triton.cdiv(ngroups, block_g), triton.cdiv(rows, block_r))
    _nibble_unpack_kernel[grid](
        w.values[row_start:], w.index[row_start:], out, rows, cols, S, S // 2, ngroups, out.stride(0),
        G=w.group, N=w.per_group, GP=triton.next_power_of_2(w.group), BLOCK_R=block_r, BLOCK_G=block_g,
        num_warps=num_warps)
    return out


def nibble_unpack_reference(w: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch ``nibble_unpack`` (all rows) of float values; int8 codes come decoded (code · scale)."""
    return w.to_dense(dtype)
