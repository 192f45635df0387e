"""Layout ``dense``: the matrix itself, zeros included (the compression output stores its fp32 factors so)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from dsf_runtime.formats._common import (
    CODE_DTYPES,
    VALUE_DTYPES,
    PackedMixin,
    check_matrix,
    check_scales,
    check_tensor,
    count_nonzero,
    part_name,
)

__all__ = ["DenseMatrix"]


@dataclass(frozen=True, eq=False)
class DenseMatrix(PackedMixin):
    """A matrix stored densely.

    Tensors:
        values: ``[rows, cols]`` float16, bfloat16 or float32; or codes (int8, float8_e4m3fn) with ``scales``.
        scales: ``[rows]`` float16/bfloat16/float32 for codes (value = code · ``scales[row]``), else None.

    Scalars:
        shape: ``(rows, cols)``.
    """

    values: torch.Tensor
    shape: tuple[int, int]
    scales: torch.Tensor | None = None

    layout: ClassVar[str] = "dense"
    parts: ClassVar[tuple[str, ...]] = ("values",)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None) -> DenseMatrix:
        """Store ``matrix`` ([rows, cols], floating) with values cast to ``dtype`` (default: its own dtype); with
        ``scales`` (``[rows]``), ``matrix`` holds codes (int8, float8_e4m3fn), stored with their row scales."""
        values = check_matrix(matrix, dtype, scales)
        return cls(values=values, shape=(values.shape[0], values.shape[1]), scales=scales)

    @cached_property
    def nnz(self) -> int:
        """Number of non-zero values."""
        return count_nonzero(self.values)

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.values[start:stop].to(dtype)

    def kernel_ready(self, device: torch.device) -> bool:
        """True on CUDA devices where the Triton kernels run: a dense factor then joins their chain (cuBLAS, the
        "prefill" path). On the CPU its pure-torch ``matmul`` is the same product."""
        from dsf_runtime.kernels import unavailable_reason

        return torch.device(device).type == "cuda" and self.scales is None and unavailable_reason(device) is None

    def validate(self, prefix: str = "") -> None:
        """Check dtypes and shapes; raises FormatError naming ``<prefix>.values`` or ``<prefix>.scales``."""
        check_tensor(part_name(prefix, "values"), self.values, (*VALUE_DTYPES, *CODE_DTYPES), self.shape)
        check_scales(part_name(prefix, "scales"), self.values, self.scales, self.shape[0])

