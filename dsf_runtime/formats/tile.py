"""Layout ``tile``: a presence bitmap per fixed tile plus the tile's packed values, the layout of the tensor-core
matmul kernel for batches above decode (docs/format.md, "Kernel layouts"; SpInfer's tile bitmaps).

The matrix is cut into tiles of ``tile_rows × tile_cols`` (``TR × TC``) elements, ``n_tr = ceil(rows / TR)`` tile
rows by ``n_tc = ceil(cols / TC)`` tile columns, numbered row-major (``t = i·n_tc + j``). Inside a tile, element
``(r, c)`` (``0 ≤ r < TR``, ``0 ≤ c < TC``) has position ``p = r·TC + c``.

- ``bitmap``: ``[n_tr·n_tc, TR·TC / 8]`` uint8; element ``p`` of tile ``t`` is stored iff bit ``p & 7`` of byte
  ``p >> 3`` is set. Bits of elements outside the matrix (padding) are 0.
- ``values``: ``[nnz]``; tile ``t``'s values are ``values[tile_ptr[t]:tile_ptr[t + 1]]`` in increasing ``p``, so a
  stored element's value sits at ``tile_ptr[t]`` plus the number of set bits before it in its tile: a kernel finds
  it with an exclusive prefix sum over the tile's bits, no index per value.
- ``tile_ptr``: ``[n_tr·n_tc + 1]`` int32 value offsets; ``tile_ptr[t + 1] − tile_ptr[t]`` is tile ``t``'s
  popcount.

Bytes: ``nnz · (value bytes) + n_tr·n_tc·(TR·TC/8 + 4) + 4``: one bit per (padded) element plus 4 bytes per tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from dsf_runtime.formats._common import (
    VALUE_DTYPES,
    FormatError,
    KernelLayoutMixin,
    check_matrix,
    check_row_ptr,
    check_tensor,
    part_name,
)
from dsf_runtime.formats.bitmask import pack_bits, popcount_rows, unpack_bits

__all__ = ["TILE_COLS", "TILE_ROWS", "TileMatrix", "tile_bytes"]

TILE_ROWS = (16, 32, 64)  # allowed TR (the kernel's rows per program: tl.dot needs >= 16)
TILE_COLS = (32, 64)  # allowed TC (the kernel's reduction step)


def tile_bytes(rows: int, cols: int, nnz: int, tile_rows: int = 16, tile_cols: int = 64, value_bytes: int = 2) -> int:
    """Bytes of a ``tile`` matrix with ``nnz`` stored values."""
    tiles = -(-rows // tile_rows) * -(-cols // tile_cols)
    return nnz * value_bytes + tiles * (tile_rows * tile_cols // 8 + 4) + 4


def _check_tile(tile_rows: Any, tile_cols: Any) -> None:
    if type(tile_rows) is not int or tile_rows not in TILE_ROWS:
        raise ValueError(f"tile_rows must be one of {TILE_ROWS}, got {tile_rows!r}")
    if type(tile_cols) is not int or tile_cols not in TILE_COLS:
        raise ValueError(f"tile_cols must be one of {TILE_COLS}, got {tile_cols!r}")


def _tile_bits(valid_rows: int, valid_cols: int, tile_rows: int, tile_cols: int, device) -> torch.Tensor:
    """The bitmap bytes ``[TR·TC/8]`` uint8 of a tile whose first ``valid_rows`` rows and ``valid_cols`` columns
    lie inside the matrix (every allowed bit set)."""
    inside = torch.zeros(tile_rows, tile_cols, dtype=torch.bool, device=device)
    inside[:valid_rows, :valid_cols] = True
    return pack_bits(inside.view(1, -1))[0]


def _tiled(dense: torch.Tensor, tile_rows: int, tile_cols: int) -> torch.Tensor:
    """``dense`` [rows, cols] zero-padded and viewed as ``[n_tr·n_tc, TR·TC]`` (tiles row-major, elements by p)."""
    rows, cols = dense.shape
    n_tr, n_tc = -(-rows // tile_rows), -(-cols // tile_cols)
    padded = dense.new_zeros(n_tr * tile_rows, n_tc * tile_cols)
    padded[:rows, :cols] = dense
    return (padded.view(n_tr, tile_rows, n_tc, tile_cols).permute(0, 2, 1, 3)
            .reshape(n_tr * n_tc, tile_rows * tile_cols))


@dataclass(frozen=True, eq=False)
class TileMatrix(KernelLayoutMixin):
    """Tile bitmaps plus packed values (module docstring).

    Tensors:
        values: ``[nnz]`` float16, bfloat16 or float32, tile by tile.
        bitmap: ``[n_tiles, TR·TC/8]`` uint8.
        tile_ptr: ``[n_tiles + 1]`` int32.

    Scalars:
        shape: ``(rows, cols)``; tile_rows: ``TR`` (16, 32, 64); tile_cols: ``TC`` (32, 64).
    """

    values: torch.Tensor
    bitmap: torch.Tensor
    tile_ptr: torch.Tensor
    shape: tuple[int, int]
    tile_rows: int
    tile_cols: int

    layout: ClassVar[str] = "tile"
    parts: ClassVar[tuple[str, ...]] = ("values", "bitmap", "tile_ptr")
    options: ClassVar[tuple[str, ...]] = ("tile_rows", "tile_cols")

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None, tile_rows: int = 16,
                   tile_cols: int = 64) -> TileMatrix:
        """Pack the non-zeros of ``matrix`` ([rows, cols]) after casting it to ``dtype`` (default: its own)."""
        dense = check_matrix(matrix, dtype)
        _check_tile(tile_rows, tile_cols)
        tiles = _tiled(dense, tile_rows, tile_cols)
        mask = tiles != 0
        values = tiles[mask]  # row-major over [tile, p]: tile by tile, increasing p
        if values.numel() >= 2**31:
            raise ValueError(f"{values.numel()} non-zeros do not fit the int32 tile_ptr; split the matrix")
        counts = mask.sum(dim=1, dtype=torch.int32)
        tile_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=dense.device)
        torch.cumsum(counts, 0, out=tile_ptr[1:])
        bitmap = pack_bits(mask)  # [n_tiles, TR·TC/8], bit p & 7 of byte p >> 3
        return cls(values=values, bitmap=bitmap, tile_ptr=tile_ptr, shape=tuple(dense.shape), tile_rows=tile_rows,
                   tile_cols=tile_cols)

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return self.values.numel()

    @property
    def grid(self) -> tuple[int, int]:
        """``(n_tr, n_tc)``: tile rows and tile columns."""
        rows, cols = self.shape
        return -(-rows // self.tile_rows), -(-cols // self.tile_cols)

    def _row_step(self, step: int) -> int:
        return max(self.tile_rows, step // self.tile_rows * self.tile_rows)

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` (decoded whole tile rows, then cut)."""
        TR, TC = self.tile_rows, self.tile_cols
        n_tr, n_tc = self.grid
        first, last = start // TR, -(-stop // TR) if stop > start else start // TR
        t0, t1 = first * n_tc, last * n_tc
        mask = unpack_bits(self.bitmap[t0:t1], TR * TC)
        tiles = torch.zeros(t1 - t0, TR * TC, dtype=dtype, device=self.device)
        lo, hi = int(self.tile_ptr[t0]), int(self.tile_ptr[t1])
        tiles.masked_scatter_(mask, self.values[lo:hi].to(dtype))
        block = tiles.view(last - first, n_tc, TR, TC).permute(0, 2, 1, 3).reshape((last - first) * TR, n_tc * TC)
        return block[start - first * TR : stop - first * TR, : self.shape[1]].contiguous()

    def validate(self, prefix: str = "") -> None:
        """Check the tile shape, dtypes, shapes, zero padding bits and popcounts against ``tile_ptr``; raises
        FormatError naming the tensor."""
        name = partial(part_name, prefix)
        try:
            _check_tile(self.tile_rows, self.tile_cols)
        except ValueError as exc:
            raise FormatError(name("bitmap"), f"cannot be read: {exc}") from None
        rows, cols = self.shape
        if rows < 0 or cols < 0:
            raise FormatError(name("values"), f"belongs to a matrix of shape {list(self.shape)}")
        TR, TC = self.tile_rows, self.tile_cols
        n_tr, n_tc = self.grid
        n_tiles = n_tr * n_tc
        check_tensor(name("values"), self.values, tuple(VALUE_DTYPES), (None,))
        check_tensor(name("bitmap"), self.bitmap, (torch.uint8,), (n_tiles, TR * TC // 8))
        check_row_ptr(name("tile_ptr"), self.tile_ptr, n_tiles, self.values.shape[0])
        # padding bits can only sit in the last tile row and the last tile column
        last_rows, last_cols = rows - (n_tr - 1) * TR, cols - (n_tc - 1) * TC
        grid = self.bitmap.view(n_tr, n_tc, TR * TC // 8)
        edges = (((n_tr - 1, 0), grid[-1:, :-1], (last_rows, TC)), ((0, n_tc - 1), grid[:-1, -1:], (TR, last_cols)),
                 ((n_tr - 1, n_tc - 1), grid[-1:, -1:], (last_rows, last_cols)))
        for (row0, col0), tiles, valid in edges:
            if n_tiles and tiles.numel() and valid != (TR, TC):
                bad = torch.nonzero((tiles & ~_tile_bits(*valid, TR, TC, self.bitmap.device)).flatten(0, 1).any(-1))
                if bad.numel():
                    i, j = divmod(int(bad[0, 0]), tiles.shape[1])
                    t = (row0 + i) * n_tc + col0 + j
                    raise FormatError(name("bitmap"), f"tile {t} sets bits outside the {rows}x{cols} matrix")
        popcount = popcount_rows(self.bitmap)
        bad = torch.nonzero(popcount != (self.tile_ptr[1:] - self.tile_ptr[:-1]))
        if bad.numel():
            t = int(bad[0, 0])
            raise FormatError(name("bitmap"), f"tile {t} has {int(popcount[t])} bits set but tile_ptr gives it "
                                              f"{int(self.tile_ptr[t + 1] - self.tile_ptr[t])} values")

    def _meta_fields(self) -> dict[str, Any]:
        return {"tile_rows": self.tile_rows, "tile_cols": self.tile_cols, "bit_order": "little"}
