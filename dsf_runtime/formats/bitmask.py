"""Layout ``bitmask``: one bit per element (little bit order) plus the non-zero values, as compressed-tensors'
sparse-bitmask, with int32 row offsets so rows can be decoded independently."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from dsf_runtime.formats._common import (
    VALUE_DTYPES,
    FormatError,
    PackedMixin,
    check_matrix,
    check_row_ptr,
    check_tensor,
    nonzero_entries,
    offsets,
    part_name,
)

__all__ = ["BitmaskMatrix", "pack_bits", "unpack_bits"]

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # fallback reasons already logged
# Above this many tokens the pure-torch path (unpack rows in chunks, then a dense GEMM) is faster than the CPU
# kernel: measured on the 2-core VM, fp16 values at density 0.3, 1536x576: 9.2 vs 9.7 ms at 128 tokens, 92 vs 22 ms
# at 1024 (576x576: 3.0 vs 4.0 ms, 37 vs 8.7 ms). Decode and small batches use the kernel.
CPU_KERNEL_MAX_TOKENS = 128


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


# Popcount of every byte value.
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


@dataclass(frozen=True, eq=False)
class BitmaskMatrix(PackedMixin):
    """One presence bit per element plus the non-zero values.

    Tensors:
        values: ``[nnz]`` float16, bfloat16 or float32; non-zeros row by row, columns ascending.
        bitmask: ``[rows, ceil(cols / 8)]`` uint8; element ``(i, j)`` is stored iff
            ``(bitmask[i, j >> 3] >> (j & 7)) & 1`` (bit order ``little``); padding bits are 0.
        row_ptr: ``[rows + 1]`` int32; ``row_ptr[i + 1] - row_ptr[i]`` is the popcount of row ``i``.

    Scalars:
        shape: ``(rows, cols)``.
    """

    values: torch.Tensor
    bitmask: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]

    layout: ClassVar[str] = "bitmask"
    parts: ClassVar[tuple[str, ...]] = ("values", "bitmask", "row_ptr")

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None) -> BitmaskMatrix:
        """Pack the non-zeros of ``matrix`` ([rows, cols]) after casting it to ``dtype`` (default: its own).

        Zeros produced by the cast are dropped; ``-0.0`` counts as zero (it unpacks as ``+0.0``).
        """
        dense = check_matrix(matrix, dtype)
        mask, _, values = nonzero_entries(dense)
        row_ptr = offsets(mask.sum(dim=1, dtype=torch.int32))
        return cls(values=values, bitmask=pack_bits(mask), row_ptr=row_ptr, shape=tuple(dense.shape))

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``y = x·Wᵀ``: on the CPU through the compiled kernel (``dsf_runtime.kernels.cpu``, fp32 accumulation)
        for up to ``CPU_KERNEL_MAX_TOKENS`` tokens; else, or when the kernel is not built or autograd needs a
        graph, ``PackedMixin.matmul``'s pure-torch path (the reference; a fallback reason is logged once).

        Args:
            x: ``[..., cols]`` float16/bfloat16/float32 on the matrix's device.
            out_dtype: dtype of ``y`` (default ``x.dtype``).

        Returns:
            ``[..., rows]`` in ``out_dtype``.
        """
        rows, cols = self.shape
        if (x.device.type == "cpu" and self.device.type == "cpu" and x.shape[-1] == cols
                and x.numel() <= CPU_KERNEL_MAX_TOKENS * cols):
            from dsf_runtime.kernels import cpu

            reason = cpu.available()
            if reason is None and torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad):
                reason = "the compiled CPU kernel has no backward"
            if reason is None:
                x2 = x.reshape(-1, cols).to(torch.float32).contiguous()
                y = cpu.bitmask_matmul(x2, self.values.contiguous(), self.bitmask.contiguous(),
                                       self.row_ptr.contiguous(), rows, cols)
                return y.to(out_dtype or x.dtype).reshape(*x.shape[:-1], rows)
            if reason not in _LOGGED:
                _LOGGED.add(reason)
                logger.info("bitmask matmul on the CPU uses the pure-torch path: %s", reason)
        return super().matmul(x, out_dtype)

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return self.values.numel()

    def dense_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a dense ``[stop - start, cols]`` tensor in ``dtype`` (default: values' dtype)."""
        mask = unpack_bits(self.bitmask[start:stop], self.shape[1])
        out = torch.zeros(mask.shape, dtype=dtype or self.dtype, device=self.device)
        lo, hi = int(self.row_ptr[start]), int(self.row_ptr[stop])
        return out.masked_scatter_(mask, self.values[lo:hi].to(out.dtype))

    def validate(self, prefix: str = "") -> None:
        """Check dtypes, shapes, padding bits and popcounts against ``row_ptr``; raises FormatError naming the
        tensor."""
        rows, cols = self.shape
        name = partial(part_name, prefix)
        check_tensor(name("values"), self.values, tuple(VALUE_DTYPES), (None,))
        check_tensor(name("bitmask"), self.bitmask, (torch.uint8,), (rows, (cols + 7) // 8))
        check_row_ptr(name("row_ptr"), self.row_ptr, rows, self.values.shape[0])
        if cols % 8 and rows:
            padding = self.bitmask[:, -1] >> (cols % 8)
            bad = torch.nonzero(padding)
            if bad.numel():
                row = int(bad[0, 0])
                raise FormatError(name("bitmask"), f"sets padding bits beyond column {cols - 1} in row {row}")
        popcount = _POPCOUNT.to(self.bitmask.device)[self.bitmask.long()].sum(dim=1)
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
