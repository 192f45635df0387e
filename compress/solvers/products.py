"""The DSF solver's large matrix products, in plain fp32 or as error-compensated TF32 ("3×TF32") on tensor cores.

3×TF32 splits each fp32 operand into a TF32 head and a TF32 tail (``x = hi + lo``, both with 10 mantissa bits,
``lo`` rounded again) and forms ``a·b ≈ hi_a·hi_b + (hi_a·lo_b + lo_a·hi_b)``; the dropped ``lo_a·lo_b`` and the
tail's rounding leave about 21 of fp32's 24 bits, against 11 for plain TF32. Every operand handed to the GEMM is
already representable in TF32, so a CPU (fp32 GEMMs) computes the same products as a tensor core, up to the
order of the fp32 sums: the CPU is where the accuracy is tested, a GPU is where it is fast (three TF32 GEMMs
against one fp32 GEMM on CUDA cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

__all__ = ["MATMUL_PRECISIONS", "MatmulPrecision", "Products", "SplitTF32", "round_tf32", "split_tf32"]

MatmulPrecision = Literal["fp32", "3xtf32"]
MATMUL_PRECISIONS: tuple[str, ...] = ("fp32", "3xtf32")

_TF32_DROPPED_BITS = 13  # fp32 has 23 stored mantissa bits, TF32 10


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, any shape) rounded to TF32's 10 mantissa bits, to nearest (ties away from zero).

    Adding half of the dropped range to the bit pattern and clearing the dropped bits rounds the magnitude; the
    sign bit is untouched and a carry moves into the exponent as it should. Finite inputs only.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_tf32 needs float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    half = 1 << (_TF32_DROPPED_BITS - 1)
    return ((bits + half) & -(1 << _TF32_DROPPED_BITS)).view(torch.float32)


class SplitTF32(NamedTuple):
    """``x ≈ hi + lo`` with both parts in TF32 (float32 tensors of ``x``'s shape)."""

    hi: torch.Tensor
    lo: torch.Tensor

    @property
    def mT(self) -> SplitTF32:  # noqa: N802 (torch's name)
        """Both parts transposed in the last two dimensions."""
        return SplitTF32(self.hi.mT, self.lo.mT)


def split_tf32(x: torch.Tensor) -> SplitTF32:
    """Head and tail of ``x`` (float32): ``hi = tf32(x)``, ``lo = tf32(x − hi)``; ``|x − hi − lo| ≤ 2⁻²²·|x|``."""
    hi = round_tf32(x)
    return SplitTF32(hi, round_tf32(x - hi))


@dataclass(frozen=True)
class Products:
    """Batched products ``a @ b`` [b, r, p] @ [b, p, q] of one solve under one precision.

    ``fp32`` runs torch's own ops (the solver's results are unchanged by this class). ``3xtf32`` takes float32
    tensors or ``SplitTF32`` pairs (split once, reused: e.g. an inverse multiplied in every ADMM step) and runs the
    three TF32 GEMMs with TF32 allowed.
    """

    precision: MatmulPrecision = "fp32"

    def split(self, x: torch.Tensor) -> torch.Tensor | SplitTF32:
        """``x`` prepared as a reusable operand: itself for fp32, its TF32 split for 3×TF32."""
        return x if self.precision == "fp32" else split_tf32(x)

    def matmul(self, a: torch.Tensor | SplitTF32, b: torch.Tensor | SplitTF32) -> torch.Tensor:
        """``a @ b``."""
        if self.precision == "fp32":
            return torch.matmul(a, b)
        a, b = _as_split(a), _as_split(b)
        with _tf32_allowed():
            return torch.matmul(a.hi, b.hi) + (torch.matmul(a.hi, b.lo) + torch.matmul(a.lo, b.hi))

    def baddbmm(self, c: torch.Tensor, a: torch.Tensor | SplitTF32, b: torch.Tensor, *, inplace: bool = False
                ) -> torch.Tensor:
        """``c + a @ b`` (3-D operands); with ``inplace`` the sum is written into ``c``."""
        if self.precision == "fp32":
            return c.baddbmm_(a, b) if inplace else torch.baddbmm(c, a, b)
        product = self.matmul(a, b)
        return c.add_(product) if inplace else c + product


def _as_split(x: torch.Tensor | SplitTF32) -> SplitTF32:
    return x if isinstance(x, SplitTF32) else split_tf32(x)


@contextmanager
def _tf32_allowed() -> Iterator[None]:
    """Allow TF32 in CUDA matmuls inside the block (the solver otherwise runs with TF32 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
