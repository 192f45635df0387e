"""Layout ``delta``: unstructured rows as 4-bit column deltas (MACKO-style), the GPU decode kernels' layout for
factors without balanced groups (docs/format.md, "Kernel layouts").

Row ``i`` is a list of entries ``(value, d)`` with ``d`` in 0..15; the column of entry ``k`` is
``col[k-1] + d + 1`` (``col[-1] = -1``). A gap of more than 15 zeros is bridged by zero-valued filler entries with
``d = 15``; each row is padded with zero entries to a multiple of ``CHUNK`` (32) entries.

- ``values``: ``[total]``;
- ``index``: ``[total // 2]`` uint8, split halves per chunk of 32 entries (byte ``j`` (0..15) of chunk ``c`` holds
  entry ``32c + j`` low and ``32c + 16 + j`` high);
- ``row_ptr``: ``[rows + 1]`` int32 entry offsets, multiples of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import ClassVar

import torch

from dsf_runtime.formats._common import (
    VALUE_DTYPES,
    FormatError,
    KernelLayoutMixin,
    check_matrix,
    check_row_ptr,
    check_tensor,
    count_nonzero,
    part_name,
)

__all__ = ["CHUNK", "DeltaMatrix", "delta_entries"]

CHUNK = 32  # entries per split-halves chunk; rows are padded to a multiple of it


def delta_entries(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per non-zero of ``w`` [rows, cols]: row, column, entry slot inside its row, 4-bit delta; and each row's
    padded entry count (``[rows]`` int64)."""
    rows, cols = w.shape
    nz = (w != 0).nonzero()
    r, c = nz[:, 0], nz[:, 1]
    prev = torch.full_like(c, -1)
    if c.numel() > 1:
        same = r[1:] == r[:-1]
        prev[1:] = torch.where(same, c[:-1], prev[1:])
    gap = c - prev - 1
    fill = gap // 16  # filler entries before this non-zero
    own = fill + 1
    row_len = torch.zeros(rows, dtype=torch.int64, device=w.device)
    row_len.index_add_(0, r, own)
    row_start = torch.cumsum(row_len, 0) - row_len
    slot = torch.cumsum(own, 0) - 1 - row_start[r]
    return r, c, slot, gap - 16 * fill, -(-row_len // CHUNK) * CHUNK


@dataclass(frozen=True, eq=False)
class DeltaMatrix(KernelLayoutMixin):
    """Rows of ``(value, 4-bit column delta)`` entries (module docstring).

    Tensors:
        values: ``[total]`` float16, bfloat16 or float32.
        index: ``[total // 2]`` uint8.
        row_ptr: ``[rows + 1]`` int32, multiples of 32, from 0 to ``total``.

    Scalars:
        shape: ``(rows, cols)``.
    """

    values: torch.Tensor
    index: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]

    layout: ClassVar[str] = "delta"
    parts: ClassVar[tuple[str, ...]] = ("values", "index", "row_ptr")

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None) -> DeltaMatrix:
        """Pack the non-zeros of ``matrix`` ([rows, cols], any mask) with values cast to ``dtype``."""
        w = check_matrix(matrix, dtype)
        rows, cols = w.shape
        r, c, slot, d, padded = delta_entries(w)
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
        row_ptr[1:] = torch.cumsum(padded, 0)
        total = int(row_ptr[-1])
        if total >= 2**31:
            raise ValueError(f"matrix {rows}x{cols} needs {total} delta entries, more than int32 offsets hold")
        pos = row_ptr[r] + slot
        values = torch.zeros(total, dtype=w.dtype, device=w.device)
        values[pos] = w[r, c]
        deltas = torch.full((total,), 15, dtype=torch.uint8, device=w.device)
        deltas[pos] = d.to(torch.uint8)
        halves = deltas.view(-1, 2, CHUNK // 2)
        index = (halves[:, 0] | (halves[:, 1] << 4)).reshape(-1).contiguous()
        return cls(values=values, index=index, row_ptr=row_ptr.to(torch.int32), shape=(rows, cols))

    @cached_property
    def nnz(self) -> int:
        """Number of non-zero stored values (fillers and padding excluded)."""
        return count_nonzero(self.values)

    @property
    def slots(self) -> int:
        """Stored entries in total, fillers and padding included."""
        return self.values.numel()

    def _entries(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local row, column and value of every entry of rows ``start:stop`` (row_ptr already valid)."""
        lo, hi = int(self.row_ptr[start]), int(self.row_ptr[stop])
        if hi == lo:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty, self.values[:0]
        halves = self.index[lo // 2 : hi // 2].view(-1, 1, CHUNK // 2)
        d = torch.cat([halves & 15, halves >> 4], dim=1).reshape(-1).long() + 1
        counts = (self.row_ptr[start + 1 : stop + 1] - self.row_ptr[start:stop]).long()
        row = torch.repeat_interleave(torch.arange(stop - start, device=d.device), counts, output_size=hi - lo)
        csum = torch.cumsum(d, 0)
        first = self.row_ptr[start:stop].long() - lo  # each row's first entry; csum restarts there
        base = torch.where(first > 0, csum[(first - 1).clamp(min=0, max=hi - lo - 1)], torch.zeros_like(first))
        return row, csum - base[row] - 1, self.values[lo:hi]

    def dense_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a dense ``[stop - start, cols]`` tensor in ``dtype`` (default: values' dtype)."""
        row, col, v = self._entries(start, stop)
        keep = v != 0
        out = torch.zeros(stop - start, self.shape[1], dtype=dtype or self.dtype, device=self.device)
        out[row[keep], col[keep]] = v[keep].to(out.dtype)
        return out

    def validate(self, prefix: str = "") -> None:
        """Check dtypes, shapes, ``row_ptr`` (0, non-decreasing, multiples of 32, ends at ``total``) and that every
        non-zero entry's column lies inside the matrix; raises FormatError naming the tensor."""
        name = partial(part_name, prefix)
        rows, cols = self.shape
        check_tensor(name("values"), self.values, tuple(VALUE_DTYPES), (None,))
        total = self.values.shape[0]
        check_tensor(name("index"), self.index, (torch.uint8,), (total // 2,))
        check_row_ptr(name("row_ptr"), self.row_ptr, rows, total)
        if bool((self.row_ptr % CHUNK != 0).any()):
            raise FormatError(name("row_ptr"), f"holds an offset that is not a multiple of {CHUNK}")
        row, col, v = self._entries(0, rows)
        bad = torch.nonzero((v != 0) & (col >= cols))
        if bad.numel():
            p = int(bad[0, 0])
            raise FormatError(name("index"), f"puts the non-zero entry {p} (row {int(row[p])}) at column "
                                             f"{int(col[p])}, outside [0, {cols})")

