"""Layout ``bsr``: block sparse rows with square ``b × b`` blocks, ``b`` in 16, 32 or 64."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dsf_runtime.formats._common import (
    VALUE_DTYPES,
    FormatError,
    PackedMixin,
    check_indices,
    check_matrix,
    check_row_ptr,
    check_tensor,
    count_nonzero,
    dtype_name,
    offsets,
    part_name,
    row_ids,
)

__all__ = ["BSRMatrix", "BLOCK_SIZES"]

BLOCK_SIZES = (16, 32, 64)


def _blocks(rows: int, cols: int, block: int) -> tuple[int, int]:
    """Number of block rows and block columns of a padded ``rows × cols`` matrix."""
    return -(-rows // block), -(-cols // block)


@dataclass(frozen=True, eq=False)
class BSRMatrix(PackedMixin):
    """Block sparse rows; the matrix is padded with zeros to multiples of ``b`` and padding is never read back.

    Tensors:
        values: ``[nblocks, b, b]`` float16, bfloat16 or float32; a block is stored iff it holds a non-zero.
        col_idx: ``[nblocks]`` int32; block column of each block, ascending within a block row.
        row_ptr: ``[ceil(rows / b) + 1]`` int32; block row ``i`` owns ``values[row_ptr[i]:row_ptr[i + 1]]``.

    Scalars:
        shape: ``(rows, cols)`` of the unpadded matrix; ``b`` is ``values.shape[1]`` (``block_size``).
    """

    values: torch.Tensor
    col_idx: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]

    layout: ClassVar[str] = "bsr"
    parts: ClassVar[tuple[str, ...]] = ("values", "col_idx", "row_ptr")
    options: ClassVar[tuple[str, ...]] = ("block_size",)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None, block_size: int = 32) -> BSRMatrix:
        """Pack the non-zero ``block_size`` blocks of ``matrix`` ([rows, cols]) cast to ``dtype``."""
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        dense = check_matrix(matrix, dtype)
        rows, cols = dense.shape
        n_brows, n_bcols = _blocks(rows, cols, block_size)
        padded = F.pad(dense, (0, n_bcols * block_size - cols, 0, n_brows * block_size - rows))
        grid = padded.view(n_brows, block_size, n_bcols, block_size).transpose(1, 2)  # [R, C, b, b]
        occupied = (grid != 0).any(dim=-1).any(dim=-1)  # [R, C]
        brow, bcol = torch.nonzero(occupied, as_tuple=True)
        return cls(
            values=grid[brow, bcol].contiguous(),
            col_idx=bcol.to(torch.int32),
            row_ptr=offsets(occupied.sum(dim=1, dtype=torch.int32)),
            shape=(rows, cols),
        )

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        prefix: str,
        shape: tuple[int, int],
        *,
        block_size: int | None = None,
        validate: bool = True,
    ) -> BSRMatrix:
        """Rebuild from ``<prefix>.values``, ``.col_idx``, ``.row_ptr``; ``block_size`` (if given) must match the
        values' block shape. ``validate`` runs ``validate(prefix)``."""
        packed = cls(**cls._take_parts(tensors, prefix), shape=(int(shape[0]), int(shape[1])))
        if validate:
            packed.validate(prefix)
        if block_size is not None and packed.values.dim() == 3 and packed.block_size != block_size:
            b = packed.block_size
            raise FormatError(part_name(prefix, "values"), f"has {b}x{b} blocks, expected {block_size}")
        return packed

    @property
    def block_size(self) -> int:
        return self.values.shape[-1]

    def _row_step(self, step: int) -> int:
        return max(self.block_size, step // self.block_size * self.block_size)

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col_idx.dtype

    @property
    def nblocks(self) -> int:
        return self.values.shape[0]

    @cached_property
    def nnz(self) -> int:
        """Number of non-zero values inside the stored blocks (zeros inside blocks are stored but not counted)."""
        return count_nonzero(self.values)

    def dense_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a dense ``[stop - start, cols]`` tensor in ``dtype`` (default: values' dtype)."""
        b = self.block_size
        rows, cols = self.shape
        first, last = start // b, -(-stop // b)
        n_bcols = _blocks(rows, cols, b)[1]
        grid = torch.zeros(last - first, n_bcols, b, b, dtype=dtype or self.dtype, device=self.device)
        lo, hi = int(self.row_ptr[first]), int(self.row_ptr[last])
        if hi > lo:
            brow = row_ids(self.row_ptr, first, last, hi - lo)
            grid[brow, self.col_idx[lo:hi].long()] = self.values[lo:hi].to(grid.dtype)
        out = grid.transpose(1, 2).reshape((last - first) * b, n_bcols * b)
        return out[start - first * b : stop - first * b, :cols]

    def validate(self, prefix: str = "") -> None:
        """Check dtypes, shapes, block size, ``row_ptr`` and block columns; raises FormatError naming the tensor."""
        rows, cols = self.shape
        name = partial(part_name, prefix)
        check_tensor(name("values"), self.values, tuple(VALUE_DTYPES), (None, None, None))
        b = self.block_size
        if b not in BLOCK_SIZES or self.values.shape[1] != b:
            raise FormatError(
                name("values"), f"has blocks of {list(self.values.shape[1:])}, expected [b, b] with b in {BLOCK_SIZES}"
            )
        n_brows, n_bcols = _blocks(rows, cols, b)
        check_tensor(name("col_idx"), self.col_idx, (torch.int32,), (self.nblocks,))
        check_row_ptr(name("row_ptr"), self.row_ptr, n_brows, self.nblocks)
        check_indices(name("col_idx"), self.col_idx, self.row_ptr, n_bcols, "block column")

    def _meta_fields(self) -> dict[str, Any]:
        return {"index_dtype": dtype_name(self.index_dtype), "block_size": self.block_size}
