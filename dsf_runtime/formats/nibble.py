"""Layout ``nibble``: balanced groups with 4-bit in-group columns, the GPU decode kernels' layout for DSF factors
solved with ``group_size`` (docs/format.md, "Kernel layouts").

Every row is cut into groups of ``G`` (``group``, 1..16) consecutive columns; each group stores exactly ``N``
(``per_group``) slots, so every row has the same length ``S`` and needs no row pointer. A slot is a value plus its
4-bit column inside the group; a group with fewer than ``N`` non-zeros stores its non-zeros first (ascending
column) and zero-valued slots after them.

- ``values``: ``[rows_pad, S]``, floats, or one-byte codes (int8, float8_e4m3fn) with ``scales`` ``[rows]``
  (value = code · ``scales[row]``, docs/format.md "Quantized values"; the decode kernel multiplies each row's sum by
  its scale); or int4 codes, uint8 ``[rows_pad, S // 2]`` packed in split halves like ``index`` (slot ``32c + j``
  in the low nibble of byte ``16c + j``, slot ``32c + 16 + j`` in its high nibble, two's complement in [-7, 7]),
  with ``scales`` ``[rows, ceil(cols / group_size)]`` (value = code · ``scales[row, col // group_size]``: the
  kernel scales each value by its column's scale). Slot ``s`` of row ``i`` belongs to group ``s // N``.
  ``rows_pad`` is ``rows`` rounded up to ``ROW_PAD``; ``S = ceil(ngroups·N / 32)·32`` (``ngroups = ceil(cols /
  G)``); pad rows and pad slots hold zeros.
- ``index``: ``[rows_pad, S // 2]`` uint8, "split halves" per chunk of 32 slots: byte ``j`` (0..15) of chunk ``c``
  holds slot ``32c + j`` in its low nibble and slot ``32c + 16 + j`` in its high nibble, so a kernel unpacks runs
  of 16 consecutive slots from each half of a byte vector. Column of slot ``s`` = ``(s // N)·G + nibble(s)``;
  zero-valued slots may point anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, ClassVar

import torch

from dsf_runtime.formats._common import (
    CODE_DTYPES,
    INT4_QMAX,
    VALUE_DTYPES,
    FormatError,
    KernelLayoutMixin,
    check_matrix,
    check_scales,
    check_tensor,
    count_nonzero,
    part_name,
)

__all__ = ["CHUNK", "ROW_PAD", "NibbleMatrix", "balance_mask", "group_counts", "nibble_bytes"]

CHUNK = 32  # slots per split-halves chunk
ROW_PAD = 16  # rows are padded to a multiple of this (kernels read whole row blocks unmasked)


def group_counts(mask: torch.Tensor, group: int = 16) -> torch.Tensor:
    """Non-zeros per group of ``group`` consecutive columns: ``[rows, ceil(cols / group)]`` int32."""
    rows, cols = mask.shape
    ngroups = -(-cols // group)
    m = torch.zeros(rows, ngroups * group, dtype=torch.int32, device=mask.device)
    m[:, :cols] = (mask != 0).to(torch.int32)
    return m.view(rows, ngroups, group).sum(-1, dtype=torch.int32)


def balance_mask(scores: torch.Tensor, per_group: int, group: int = 16) -> torch.Tensor:
    """Top-``per_group`` mask per group of ``group`` consecutive columns of every row (ties: lower column first);
    a last partial group keeps ``min(per_group, its width)``.

    Args:
        scores: ``[rows, cols]`` saliency, any float dtype and device.

    Returns:
        bool ``[rows, cols]``.
    """
    _check_group(group, per_group)
    rows, cols = scores.shape
    ngroups = -(-cols // group)
    s = torch.full((rows, ngroups * group), float("-inf"), dtype=torch.float32, device=scores.device)
    s[:, :cols] = scores.float().abs()
    top = s.view(rows, ngroups, group).topk(per_group, dim=-1, sorted=False).indices
    mask = torch.zeros(rows, ngroups, group, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, top, True)
    return mask.view(rows, ngroups * group)[:, :cols].contiguous()


def nibble_bytes(rows: int, cols: int, per_group: int, group: int = 16, value_bytes: float = 2) -> float:
    """Bytes of a ``nibble`` matrix (padding included, scales not), for choosing layouts and budgets
    (``value_bytes``: 0.5 for int4 codes)."""
    S = math.ceil(math.ceil(cols / group) * per_group / CHUNK) * CHUNK
    return math.ceil(max(rows, 1) / ROW_PAD) * ROW_PAD * S * (value_bytes + 0.5)


def _check_group(group: Any, per_group: Any = None) -> None:
    if not (isinstance(group, int) and not isinstance(group, bool) and 1 <= group <= 16):
        raise ValueError(f"group must be an integer in 1..16 (4-bit in-group index), got {group!r}")
    if per_group is not None and not (
        isinstance(per_group, int) and not isinstance(per_group, bool) and 1 <= per_group <= group
    ):
        raise ValueError(f"per_group must be an integer in 1..group={group}, got {per_group!r}")


def _split_halves(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, S]`` 4-bit entries -> ``[rows, S // 2]`` bytes, split halves per 32-slot chunk."""
    rows, S = nibbles.shape
    n = (nibbles & 15).view(rows, S // CHUNK, 2, CHUNK // 2)
    return (n[:, :, 0] | (n[:, :, 1] << 4)).reshape(rows, S // 2).contiguous()


def _join_halves(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_split_halves``: uint8 ``[rows, S // 2]`` -> ``[rows, S]`` nibbles."""
    rows, half = packed.shape
    b = packed.view(rows, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(rows, 2 * half)


def _padded_dims(rows: int, cols: int, group: int, per_group: int) -> tuple[int, int, int]:
    """``(rows_pad, S, ngroups)`` of a ``rows × cols`` matrix."""
    ngroups = -(-cols // group)
    return -(-max(rows, 1) // ROW_PAD) * ROW_PAD, -(-(ngroups * per_group) // CHUNK) * CHUNK, ngroups


@dataclass(frozen=True, eq=False)
class NibbleMatrix(KernelLayoutMixin):
    """Balanced groups of ``group`` columns with ``per_group`` slots each (module docstring).

    Tensors:
        values: ``[rows_pad, S]`` float16, bfloat16 or float32, or int8/float8_e4m3fn codes with ``scales``; or
            int4 codes, uint8 ``[rows_pad, S // 2]`` in split halves, with ``scales`` and ``group_size``.
        index: ``[rows_pad, S // 2]`` uint8, two 4-bit in-group columns per byte (split halves).
        scales: ``[rows]`` float16/bfloat16/float32 for one-byte codes, ``[rows, ceil(cols / group_size)]`` for
            int4 codes, else None.

    Scalars:
        shape: ``(rows, cols)``; group: ``G`` (1..16); per_group: ``N`` (1..G); group_size: columns per int4
        scale, else None.
    """

    values: torch.Tensor
    index: torch.Tensor
    shape: tuple[int, int]
    group: int
    per_group: int
    scales: torch.Tensor | None = None
    group_size: int | None = None

    layout: ClassVar[str] = "nibble"
    parts: ClassVar[tuple[str, ...]] = ("values", "index")
    options: ClassVar[tuple[str, ...]] = ("group", "per_group", "group_size")

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None, group: int = 16,
                   per_group: int | None = None, scales: torch.Tensor | None = None,
                   group_size: int | None = None) -> NibbleMatrix:
        """Pack ``matrix`` ([rows, cols]) whose groups hold at most ``per_group`` non-zeros (default: the largest
        group count, at least 1), values cast to ``dtype``; with ``scales`` (``[rows]``), ``matrix`` holds
        one-byte codes (int8, float8_e4m3fn), stored with their row scales; with ``group_size`` too, int4 codes
        (int8 in [-7, 7]) with scales ``[rows, ceil(cols / group_size)]``, stored two per byte.

        Raises:
            ValueError: a group holds more than ``per_group`` non-zeros (balance the mask with ``balance_mask``,
                or store the matrix as ``delta``).
        """
        w = check_matrix(matrix, dtype, scales, group_size)
        fp8 = w.dtype == torch.float8_e4m3fn
        if fp8:  # torch has no gather for float8: move the bytes, with -0.0 as 0
            bits = w.view(torch.uint8)
            w = torch.where((bits & 0x7F) == 0, 0, bits).to(torch.uint8)
        _check_group(group)
        rows, cols = w.shape
        counts = group_counts(w, group)
        top = int(counts.max()) if counts.numel() else 0
        n = max(top, 1) if per_group is None else per_group
        _check_group(group, n)
        if top > n:
            r, g = (counts > n).nonzero()[0].tolist()
            raise ValueError(f"row {r} group {g} (columns {g * group}..{g * group + group - 1}) holds "
                             f"{int(counts[r, g])} non-zeros > per_group={n}; balance the mask with "
                             "balance_mask(...) or use the 'delta' layout")
        rows_pad, S, ngroups = _padded_dims(rows, cols, group, n)
        padded = torch.zeros(rows, ngroups * group, dtype=w.dtype, device=w.device)
        padded[:, :cols] = w
        g = padded.view(rows, ngroups, group)
        # non-zeros first, ascending column inside each group (stable sort of the "is zero" key)
        order = torch.sort((g == 0).to(torch.int8), dim=-1, stable=True).indices[..., :n]
        values = torch.zeros(rows_pad, S, dtype=w.dtype, device=w.device)
        values[:rows, : ngroups * n] = torch.gather(g, -1, order).reshape(rows, ngroups * n)
        if group_size is not None:
            values = _split_halves(values.view(torch.uint8))
        elif fp8:
            values = values.view(torch.float8_e4m3fn)
        nib = torch.zeros(rows_pad, S, dtype=torch.uint8, device=w.device)
        nib[:rows, : ngroups * n] = order.reshape(rows, ngroups * n).to(torch.uint8)
        return cls(values=values, index=_split_halves(nib), shape=(rows, cols), group=group, per_group=n,
                   scales=scales, group_size=group_size)

    def slot_values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The stored values of rows ``start:stop`` slot by slot, ``[stop - start, S]``: floats, one-byte codes, or
        int4 codes unpacked to int8 (no scales applied)."""
        stop = self.values.shape[0] if stop is None else stop
        if self.group_size is None:
            return self.values[start:stop]
        return (_join_halves(self.values[start:stop]).to(torch.int8) ^ 8) - 8  # sign-extend the low 4 bits

    @cached_property
    def nnz(self) -> int:
        """Number of non-zero stored values (zero-valued padding slots excluded)."""
        if self.group_size is not None:
            return int(((self.values & 15) != 0).sum()) + int(((self.values >> 4) != 0).sum())
        return count_nonzero(self.values)

    @property
    def slots(self) -> int:
        """Stored slots per row, ``S``."""
        return self.index.shape[-1] * 2

    def columns(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Column of every slot of rows ``start:stop``: ``[stop - start, S]`` int64 (zero slots included)."""
        stop = self.shape[0] if stop is None else stop
        nib = _join_halves(self.index[start:stop]).long()
        s = torch.arange(self.slots, device=self.index.device)
        return (s // self.per_group) * self.group + nib

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        col = self.columns(start, stop)
        v = self.slot_values(start, stop)
        if v.dtype == torch.float8_e4m3fn:
            v = v.float()
        keep = v != 0
        out = torch.zeros(stop - start, self.shape[1], dtype=dtype, device=self.device)
        rr = torch.arange(stop - start, device=self.device)[:, None].expand_as(col)
        out[rr[keep], col[keep]] = v[keep].to(out.dtype)
        return out

    def validate(self, prefix: str = "") -> None:
        """Check ``group``/``per_group``, dtypes, the padded shapes, zero padding, and that every non-zero slot's
        column lies inside its group and the matrix with non-zeros first and strictly ascending inside each group;
        raises FormatError naming the tensor."""
        name = partial(part_name, prefix)
        rows, cols = self.shape
        try:
            _check_group(self.group, self.per_group)
        except ValueError as exc:
            raise FormatError(name("index"), f"cannot be read: {exc}") from None
        G, N = self.group, self.per_group
        rows_pad, S, ngroups = _padded_dims(rows, cols, G, N)
        if self.group_size is not None:
            check_tensor(name("values"), self.values, (torch.uint8,), (rows_pad, S // 2))
            if bool(((self.values & 15) == 8).any() | ((self.values >> 4) == 8).any()):
                raise FormatError(name("values"), f"holds the int4 code -8; codes lie in [-{INT4_QMAX}, {INT4_QMAX}]")
        else:
            check_tensor(name("values"), self.values, (*VALUE_DTYPES, *CODE_DTYPES), (rows_pad, S))
        check_scales(name("scales"), self.values, self.scales, self.shape, self.group_size)
        check_tensor(name("index"), self.index, (torch.uint8,), (rows_pad, S // 2))
        v = self.slot_values()
        if v.dtype == torch.float8_e4m3fn:
            v = v.float()
        if bool((v[rows:] != 0).any()) or bool((v[:, ngroups * N:] != 0).any()):
            raise FormatError(name("values"), "holds non-zeros in its padding (rows >= shape[0] or slots >= "
                                              f"ceil(cols / group)·per_group = {ngroups * N})")
        nz = (v[:rows, : ngroups * N] != 0).view(rows, ngroups, N)
        col = self.columns(0, rows)[:, : ngroups * N].view(rows, ngroups, N)
        nib = col - (torch.arange(ngroups, device=col.device) * G)[None, :, None]
        bad = nz & ((nib >= G) | (col >= cols))
        if bad.any():
            r, g, _ = (int(i) for i in bad.nonzero()[0])
            raise FormatError(name("index"), f"row {r} group {g} points a non-zero past its group or column {cols - 1}")
        order = (nz[..., 1:] & ~nz[..., :-1]) | (nz[..., 1:] & (nib[..., 1:] <= nib[..., :-1]))
        if order.any():
            r, g, _ = (int(i) for i in order.nonzero()[0])
            raise FormatError(name("index"), f"row {r} group {g} does not hold its non-zeros first with strictly "
                                             "ascending columns")

    def _meta_fields(self) -> dict[str, Any]:
        return {"group": self.group, "per_group": self.per_group}
