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
    vals_ptr,  # [>= rows, SV] stored values, starting at the first row to unpack (int4 codes: uint8, SV = S2)
    nib_ptr,  # [>= rows, S2] uint8 in-group columns, split halves per 32-slot chunk
    scale_ptr,  # [>= rows] row scales (HAS_SCALE) or [>= rows, n_sg] group scales (INT4), from the first row
    out_ptr,  # [rows, >= cols] dense output, row stride stride_o, unit column stride
    rows,  # rows to write
    cols,  # columns to write
    SV,  # stored value elements per row: S, or S2 for int4 codes
    S2,  # index bytes per row (S // 2)
    n_sg,  # int4: scales per row
    ngroups,  # ceil(cols / G)
    stride_o,  # elements between rows of out
    G: tl.constexpr,  # group width
    N: tl.constexpr,  # slots per group
    GP: tl.constexpr,  # next power of two >= G
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_G: tl.constexpr,  # groups per program
    HAS_SCALE: tl.constexpr,  # one-byte codes: times scale_ptr[row]
    INT4: tl.constexpr,  # int4 codes: times scale_ptr[row, col // GS]
    GS: tl.constexpr,  # int4: columns per scale
):
    pid_g = tl.program_id(0)
    pid_r = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GP)
    ok = (r < rows)[:, None] & (g < ngroups)[None, :]  # [R, BG]
    r64 = r.to(tl.int64)[:, None]
    if HAS_SCALE:
        row_scale = tl.load(scale_ptr + r, mask=r < rows, other=0.0).to(tl.float32)[:, None]
    dense = tl.zeros([BLOCK_R, BLOCK_G, GP], dtype=out_ptr.dtype.element_ty)
    for j in tl.static_range(N):
        slot = g * N + j  # [BG]
        byte_off = (slot // 32) * 16 + slot % 16
        shift = ((slot % 32) >= 16).to(tl.uint8) * 4
        byte = tl.load(nib_ptr + r64 * S2 + byte_off[None, :], mask=ok, other=0)
        nib = ((byte >> shift[None, :]) & 15).to(tl.int32)
        if INT4:
            packed = tl.load(vals_ptr + r64 * SV + byte_off[None, :], mask=ok, other=0)
            code = ((((packed >> shift[None, :]) & 15).to(tl.int32)) ^ 8) - 8
            col = g[None, :] * G + nib
            scale = tl.load(scale_ptr + r64 * n_sg + col // GS, mask=ok & (col < cols), other=0.0)
            v = code.to(tl.float32) * scale.to(tl.float32)
        else:
            v = tl.load(vals_ptr + r64 * SV + slot[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                v = v * row_scale
        v = v.to(out_ptr.dtype.element_ty)
        hit = (nib[:, :, None] == c[None, None, :]) & (v != 0)[:, :, None]
        dense = tl.where(hit, v[:, :, None], dense)
    col = g[None, :, None] * G + c[None, None, :]
    keep = (c < G)[None, None, :] & (col < cols) & (r < rows)[:, None, None]
    tl.store(out_ptr + r.to(tl.int64)[:, None, None] * stride_o + col, dense, mask=keep)


def nibble_unpack(w: Any, out: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                  row_start: int = 0, row_stop: int | None = None, block_r: int = 4, block_g: int = 16,
                  num_warps: int = 4) -> torch.Tensor:
    """Dense copy of rows ``row_start:row_stop`` (default all) of a ``nibble`` matrix, codes decoded in registers
    (code · its row or group scale, exact in fp32, then one rounding to the output dtype).

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
    int4 = w.group_size is not None
    scales = w.scales[row_start:] if w.scales is not None else out
    grid = (triton.cdiv(ngroups, block_g), triton.cdiv(rows, block_r))
    _nibble_unpack_kernel[grid](
        w.values[row_start:], w.index[row_start:], scales, out, rows, cols, w.values.shape[1], w.slots // 2,
        scales.shape[1] if int4 else 1, ngroups, out.stride(0),
        G=w.group, N=w.per_group, GP=triton.next_power_of_2(w.group), BLOCK_R=block_r, BLOCK_G=block_g,
        HAS_SCALE=w.scales is not None and not int4, INT4=int4, GS=w.group_size or 1, num_warps=num_warps)
    return out


def nibble_unpack_reference(w: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch ``nibble_unpack`` (all rows): codes decoded (code · scale)."""
    return w.to_dense(dtype)
