"""Decompress a ``tile`` matrix into a dense buffer; the prefill and materialize paths feed it to cuBLAS.

One program per tile: it decodes the tile exactly as ``tile_matmul`` does (a stored element's value is at
``tile_ptr[t]`` plus the set bits before it, an exclusive prefix sum over the tile's bits, then a masked gather
from the tile's contiguous values) and writes the ``TR × TC`` block, zeros included, in one coalesced store masked
to the matrix's edges.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["tile_unpack"]


@triton.jit
def _tile_unpack_kernel(
    vals_ptr,  # [nnz] stored values, tile by tile
    bitmap_ptr,  # [n_tiles, TR*TC/8] uint8 presence bits
    tile_ptr_ptr,  # [n_tiles + 1] int32 value offsets
    out_ptr,  # [rows, >= cols] dense output, row stride stride_o, unit column stride
    rows, cols, n_tc, stride_o,
    TR: tl.constexpr, TC: tl.constexpr,
):
    t = tl.program_id(0)
    i, j = t // n_tc, t % n_tc
    r = tl.arange(0, TR)
    c = tl.arange(0, TC)
    pos = r[:, None] * TC + c[None, :]
    byte = tl.load(bitmap_ptr + t.to(tl.int64) * (TR * TC // 8) + pos // 8)
    bit = ((byte >> (pos % 8).to(tl.uint8)) & 1).to(tl.int32)  # [TR, TC]
    row_total = tl.sum(bit, axis=1)
    before = tl.cumsum(row_total, axis=0) - row_total
    index = before[:, None] + tl.cumsum(bit, axis=1) - bit
    base = tl.load(tile_ptr_ptr + t)
    w = tl.load(vals_ptr + base + index, mask=bit != 0, other=0.0)
    row = i * TR + r
    col = j * TC + c
    ok = (row < rows)[:, None] & (col < cols)[None, :]
    tl.store(out_ptr + row.to(tl.int64)[:, None] * stride_o + col[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def tile_unpack(w: Any, out: torch.Tensor | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[rows, cols]`` matrix of a ``tile`` matrix ``w`` (``dsf_runtime.formats.TileMatrix``).

    Args:
        w: the matrix, layout ``tile``, on a device the Triton kernels run on.
        out: optional destination ``[rows, cols]`` (unit column stride, any row stride) on ``w``'s device.
        dtype: dtype of a new output (default ``w.dtype``); ignored when ``out`` is given.

    Returns:
        ``out`` or a new tensor; every element is written.
    """
    if w.layout != "tile":
        raise ValueError(f"tile_unpack needs a 'tile' matrix, got layout {w.layout!r}")
    rows, cols = w.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype or w.dtype, device=w.device)
    elif tuple(out.shape) != (rows, cols) or out.stride(1) != 1 or out.device != w.device:
        raise ValueError(f"out must be [{rows}, {cols}] on {w.device} with unit column stride, "
                         f"got {list(out.shape)} strides {out.stride()} on {out.device}")
    n_tr, n_tc = w.grid
    if rows == 0 or cols == 0:
        return out
    if w.nnz == 0:  # no values buffer to point the kernel at
        return out.zero_()
    _tile_unpack_kernel[(n_tr * n_tc,)](w.values, w.bitmap, w.tile_ptr, out, rows, cols, n_tc, out.stride(0),
                                        TR=w.tile_rows, TC=w.tile_cols)
    return out
