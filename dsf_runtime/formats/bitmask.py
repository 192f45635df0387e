"""Layout ``bitmask``: one bit per element (little bit order) plus the non-zero values, as compressed-tensors'
sparse-bitmask, with int32 row offsets so rows can be decoded independently."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from dsf_runtime.formats._common import (
    CODE_DTYPES,
    VALUE_DTYPES,
    FormatError,
    PackedMixin,
    check_int4_values,
    check_matrix,
    check_row_ptr,
    check_scales,
    check_tensor,
    nonzero_entries,
    offsets,
    pack_int4,
    part_name,
)

__all__ = ["BitmaskMatrix", "cpu_linear", "pack_bits", "unpack_bits"]

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # fallback reasons already logged
# Above this many tokens the pure-torch path (unpack rows in chunks, then a dense GEMM) is faster than the CPU
# kernel: measured on the 2-core VM, fp16 values at density 0.3, 1536x576: 9.2 vs 9.7 ms at 128 tokens, 92 vs 22 ms
# at 1024 (576x576: 3.0 vs 4.0 ms, 37 vs 8.7 ms). Decode and small batches use the kernel.
CPU_KERNEL_MAX_TOKENS = 128
# Values the CPU kernel reads: floats, and int8 codes with row scales (float8 codes take the pure-torch path).
_KERNEL_DTYPES = (*VALUE_DTYPES, *CODE_DTYPES, torch.uint8)  # uint8: int4 codes


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[rows, cols]`` mask into uint8 ``[rows, ceil(cols / 8)]``, bit ``j & 7`` of byte ``j >> 3``."""
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    bits = padded.view(rows, nbytes, 8)
    out = bits[..., 0].clone()
    for bit in range(1, 8):  # eight vectorized passes, not a loop over rows
        out |= bits[..., bit] << bit
    return out


def unpack_bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``[rows, nbytes]`` -> bool ``[rows, cols]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], bitmask.shape[1] * 8)[:, :cols].bool()


def popcount_rows(bitmask: torch.Tensor) -> torch.Tensor:
    """Set bits per row of a uint8 ``[rows, nbytes]`` bitmask, as int32 ``[rows]``; the temporaries are uint8 of the
    bitmask's size (a lookup table indexed by the bytes would need int64 indices, eight times the size)."""
    b = bitmask - ((bitmask >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return ((b + (b >> 4)) & 0x0F).sum(dim=1, dtype=torch.int32)


def cpu_linear(factors: Sequence[object], x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``y = F₀·(F₁·(…·x))`` in one call of the compiled CPU kernel (``dsf_runtime.kernels.cpu.bitmask_linear``:
    fp32 accumulation, fp32 intermediates kept in cache), or None when the kernel does not take it: a factor is
    not a CPU ``BitmaskMatrix`` (float values or int8/float8/int4 codes), ``x`` is not on the CPU, more than ``CPU_KERNEL_MAX_TOKENS`` tokens (the
    pure-torch unpack + GEMM is faster there), or, logged once with the reason, the kernel is not built or
    autograd needs a graph. The caller then runs the pure-torch path.

    Args:
        factors: outermost first, chaining (``factors[k].shape[1] == factors[k + 1].shape[0]``).
        x: ``[..., cols of the last factor]`` float16/bfloat16/float32.
        out_dtype: dtype of ``y`` (default ``x.dtype``).

    Returns:
        ``[..., rows of factors[0]]`` in ``out_dtype``, or None.
    """
    cols = x.shape[-1]
    if (x.device.type != "cpu" or x.numel() > CPU_KERNEL_MAX_TOKENS * cols
            or not all(type(f) is BitmaskMatrix and f.values.device.type == "cpu" and f.dtype in _KERNEL_DTYPES
                       for f in factors)
            or factors[-1].shape[1] != cols):
        return None
    from dsf_runtime.kernels import cpu

    reason = cpu.available()
    if reason is None and torch.is_grad_enabled() and (x.requires_grad or any(f.values.requires_grad for f in factors)):
        reason = "the compiled CPU kernel has no backward"
    if reason is not None:
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            logger.info("bitmask matmul on the CPU uses the pure-torch path: %s", reason)
        return None
    x32 = (x if x.dtype == torch.float32 else x.float()).contiguous()
    y = cpu.bitmask_linear(x32, [(f.values, f.bitmask, f.row_ptr, f.scales, f.shape[1], f.group_size)
                                 for f in factors])
    out_dtype = out_dtype or x.dtype
    return y if out_dtype == torch.float32 else y.to(out_dtype)


@dataclass(frozen=True, eq=False)
class BitmaskMatrix(PackedMixin):
    """One presence bit per element plus the non-zero values.

    Tensors:
        values: ``[nnz]`` float16, bfloat16 or float32; non-zeros row by row, columns ascending. Or codes (int8,
            float8_e4m3fn) with ``scales``, or int4 codes packed two per byte, uint8 ``[ceil(nnz / 2)]``.
        bitmask: ``[rows, ceil(cols / 8)]`` uint8; element ``(i, j)`` is stored iff
            ``(bitmask[i, j >> 3] >> (j & 7)) & 1`` (bit order ``little``); padding bits are 0.
        row_ptr: ``[rows + 1]`` int32; ``row_ptr[i + 1] - row_ptr[i]`` is the popcount of row ``i``.
        scales: for codes, ``[rows]`` float16/bfloat16/float32 (value = code · ``scales[row]``), or for int4
            ``[rows, ceil(cols / group_size)]`` (value = code · ``scales[row, col // group_size]``); else None.

    Scalars:
        shape: ``(rows, cols)``; group_size: columns per int4 scale, else None.
    """

    values: torch.Tensor
    bitmask: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]
    scales: torch.Tensor | None = None
    group_size: int | None = None

    layout: ClassVar[str] = "bitmask"
    parts: ClassVar[tuple[str, ...]] = ("values", "bitmask", "row_ptr")
    options: ClassVar[tuple[str, ...]] = ("group_size",)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None, group_size: int | None = None) -> BitmaskMatrix:
        """Pack the non-zeros of ``matrix`` ([rows, cols]) after casting it to ``dtype`` (default: its own); with
        ``scales`` (``[rows]``), ``matrix`` holds codes (int8, float8_e4m3fn), stored with their row scales; with
        ``group_size`` too, int4 codes (int8 in [-7, 7]) with scales ``[rows, ceil(cols / group_size)]``.

        Zeros produced by the cast are dropped (and zero codes); ``-0.0`` counts as zero (it unpacks as ``+0.0``).
        """
        dense = check_matrix(matrix, dtype, scales, group_size)
        mask, _, values = nonzero_entries(dense)
        row_ptr = offsets(mask.sum(dim=1, dtype=torch.int32))
        if group_size is not None:
            values = pack_int4(values)
        return cls(values=values, bitmask=pack_bits(mask), row_ptr=row_ptr, shape=tuple(dense.shape), scales=scales,
                   group_size=group_size)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``y = x·Wᵀ``: on the CPU through the compiled kernel when ``cpu_linear`` takes it, else
        ``PackedMixin.matmul``'s pure-torch path (the reference).

        Args:
            x: ``[..., cols]`` float16/bfloat16/float32 on the matrix's device.
            out_dtype: dtype of ``y`` (default ``x.dtype``).

        Returns:
            ``[..., rows]`` in ``out_dtype``.
        """
        y = cpu_linear((self,), x, out_dtype)
        return super().matmul(x, out_dtype) if y is None else y

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.row_ptr[-1]) if self.group_size is not None else self.values.numel()

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        mask = unpack_bits(self.bitmask[start:stop], self.shape[1])
        out = torch.zeros(mask.shape, dtype=dtype, device=self.device)
        lo, hi = int(self.row_ptr[start]), int(self.row_ptr[stop])
        return out.masked_scatter_(mask, self._stored_values(lo, hi).to(out.dtype))

    def validate(self, prefix: str = "") -> None:
        """Check dtypes, shapes, padding bits and popcounts against ``row_ptr``; raises FormatError naming the
        tensor."""
        rows, cols = self.shape
        name = partial(part_name, prefix)
        check_scales(name("scales"), self.values, self.scales, self.shape, self.group_size)
        check_tensor(name("bitmask"), self.bitmask, (torch.uint8,), (rows, (cols + 7) // 8))
        if self.group_size is not None:  # row_ptr first: it says how many codes the values hold
            check_tensor(name("row_ptr"), self.row_ptr, (torch.int32,), (rows + 1,))
            nnz = int(self.row_ptr[-1])
            check_row_ptr(name("row_ptr"), self.row_ptr, rows, nnz)
            check_int4_values(name("values"), self.values, nnz)
        else:
            check_tensor(name("values"), self.values, (*VALUE_DTYPES, *CODE_DTYPES), (None,))
            nnz = self.values.shape[0]
            check_row_ptr(name("row_ptr"), self.row_ptr, rows, nnz)
        if cols % 8 and rows:
            padding = self.bitmask[:, -1] >> (cols % 8)
            bad = torch.nonzero(padding)
            if bad.numel():
                row = int(bad[0, 0])
                raise FormatError(name("bitmask"), f"sets padding bits beyond column {cols - 1} in row {row}")
        popcount = popcount_rows(self.bitmask)
        bad = torch.nonzero(popcount != (self.row_ptr[1:] - self.row_ptr[:-1]))
        if bad.numel():
            i = int(bad[0, 0])
            raise FormatError(
                name("bitmask"),
                f"row {i} has {int(popcount[i])} bits set but row_ptr gives it "
                f"{int(self.row_ptr[i + 1] - self.row_ptr[i])} values",
            )

    def _meta_fields(self) -> dict[str, Any]:
        return {"bit_order": "little"}
