"""Layout ``dense``: the matrix itself, zeros included (the compression output stores its fp32 factors so)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from dsf_runtime.formats._common import (
    VALUE_DTYPES,
    PackedMixin,
    check_matrix,
    check_tensor,
    count_nonzero,
    part_name,
)

__all__ = ["DenseMatrix"]


@dataclass(frozen=True, eq=False)
class DenseMatrix(PackedMixin):
    """A matrix stored densely.

    Tensors:
        values: ``[rows, cols]`` float16, bfloat16 or float32.

    Scalars:
        shape: ``(rows, cols)``.
    """

    values: torch.Tensor
    shape: tuple[int, int]

    layout: ClassVar[str] = "dense"
    parts: ClassVar[tuple[str, ...]] = ("values",)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None) -> DenseMatrix:
        """Store ``matrix`` ([rows, cols], floating) with values cast to ``dtype`` (default: its own dtype)."""
        values = check_matrix(matrix, dtype)
        return cls(values=values, shape=(values.shape[0], values.shape[1]))


    @cached_property
    def nnz(self) -> int:
        """Number of non-zero values."""
        return count_nonzero(self.values)

    def dense_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a dense ``[stop - start, cols]`` tensor in ``dtype`` (default: values' dtype)."""
        return self.values[start:stop].to(dtype or self.dtype)

    def kernel_ready(self, device: torch.device) -> bool:
        """True on CUDA devices where the Triton kernels run: a dense factor then joins their chain (cuBLAS, the
        "prefill" path). On the CPU its pure-torch ``matmul`` is the same product."""
        from dsf_runtime.kernels import unavailable_reason

        return torch.device(device).type == "cuda" and unavailable_reason(device) is None

    def validate(self, prefix: str = "") -> None:
        """Check dtype and shape; raises FormatError naming ``<prefix>.values``."""
        check_tensor(part_name(prefix, "values"), self.values, tuple(VALUE_DTYPES), self.shape)

