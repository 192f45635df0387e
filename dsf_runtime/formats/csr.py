"""Layout ``csr``: compressed sparse rows with int16 column indices when they fit."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from dsf_runtime.formats._common import (
    CODE_DTYPES,
    VALUE_DTYPES,
    PackedMixin,
    check_indices,
    check_int4_values,
    check_matrix,
    check_row_ptr,
    check_scales,
    check_tensor,
    dtype_name,
    nonzero_entries,
    offsets,
    pack_int4,
    part_name,
    row_ids,
)

__all__ = ["CSRMatrix", "INT16_MAX_COLS"]

# Column indices are int16 when every index (at most cols - 1) fits: cols <= 32768.
INT16_MAX_COLS = 32768


@dataclass(frozen=True, eq=False)
class CSRMatrix(PackedMixin):
    """Compressed sparse rows.

    Tensors:
        values: ``[nnz]`` float16, bfloat16 or float32; non-zeros row by row, columns ascending. Or codes (int8,
            float8_e4m3fn) with ``scales``, or int4 codes packed two per byte, uint8 ``[ceil(nnz / 2)]``.
        col_idx: ``[nnz]`` int16 if ``cols <= 32768`` else int32; the column of each value.
        row_ptr: ``[rows + 1]`` int32; row ``i`` owns ``values[row_ptr[i]:row_ptr[i + 1]]``.
        scales: for codes, ``[rows]`` float16/bfloat16/float32 (value = code · ``scales[row]``), or for int4
            ``[rows, ceil(cols / group_size)]`` (value = code · ``scales[row, col // group_size]``); else None.

    Scalars:
        shape: ``(rows, cols)``; group_size: columns per int4 scale, else None.
    """

    values: torch.Tensor
    col_idx: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]
    scales: torch.Tensor | None = None
    group_size: int | None = None

    layout: ClassVar[str] = "csr"
    parts: ClassVar[tuple[str, ...]] = ("values", "col_idx", "row_ptr")
    options: ClassVar[tuple[str, ...]] = ("group_size",)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None, group_size: int | None = None) -> CSRMatrix:
        """Pack the non-zeros of ``matrix`` ([rows, cols]) after casting it to ``dtype`` (default: its own); with
        ``scales`` (``[rows]``), ``matrix`` holds codes (int8, float8_e4m3fn), stored with their row scales; with
        ``group_size`` too, int4 codes (int8 in [-7, 7]) with scales ``[rows, ceil(cols / group_size)]``.

        Zeros produced by the cast are dropped (and zero codes); ``-0.0`` counts as zero (it unpacks as ``+0.0``).
        """
        dense = check_matrix(matrix, dtype, scales, group_size)
        rows, cols = dense.shape
        mask, positions, values = nonzero_entries(dense)
        row_ptr = offsets(mask.sum(dim=1, dtype=torch.int32))
        index_dtype = torch.int16 if cols <= INT16_MAX_COLS else torch.int32
        col_idx = (positions % max(cols, 1)).to(index_dtype)
        if group_size is not None:
            values = pack_int4(values)
        return cls(values=values, col_idx=col_idx, row_ptr=row_ptr, shape=(rows, cols), scales=scales,
                   group_size=group_size)

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return self.col_idx.numel()

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col_idx.dtype

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        cols = self.shape[1]
        out = torch.zeros(stop - start, cols, dtype=dtype, device=self.device)
        lo, hi = int(self.row_ptr[start]), int(self.row_ptr[stop])
        if hi > lo:
            rows = row_ids(self.row_ptr, start, stop, hi - lo)
            out.view(-1)[rows * cols + self.col_idx[lo:hi].long()] = self._stored_values(lo, hi).to(out.dtype)
        return out

    def validate(self, prefix: str = "") -> None:
        """Check dtypes, shapes, ``row_ptr`` and column indices; raises FormatError naming the tensor."""
        rows, cols = self.shape
        name = partial(part_name, prefix)
        check_scales(name("scales"), self.values, self.scales, self.shape, self.group_size)
        index_dtypes = (torch.int16, torch.int32) if cols <= INT16_MAX_COLS else (torch.int32,)
        if self.group_size is not None:
            check_tensor(name("col_idx"), self.col_idx, index_dtypes, (None,))
            nnz = self.col_idx.shape[0]
            check_int4_values(name("values"), self.values, nnz)
        else:
            check_tensor(name("values"), self.values, (*VALUE_DTYPES, *CODE_DTYPES), (None,))
            nnz = self.values.shape[0]
            check_tensor(name("col_idx"), self.col_idx, index_dtypes, (nnz,))
        check_row_ptr(name("row_ptr"), self.row_ptr, rows, nnz)
        check_indices(name("col_idx"), self.col_idx, self.row_ptr, cols, "column")

    def _meta_fields(self) -> dict[str, Any]:
        return {"index_dtype": dtype_name(self.index_dtype)}
