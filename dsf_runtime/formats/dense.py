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
    check_int4_values,
    check_matrix,
    check_scales,
    check_tensor,
    count_nonzero,
    pack_int4,
    part_name,
    unpack_int4,
)

__all__ = ["DenseMatrix"]


@dataclass(frozen=True, eq=False)
class DenseMatrix(PackedMixin):
    """A matrix stored densely.

    Tensors:
        values: ``[rows, cols]`` float16, bfloat16 or float32; or codes (int8, float8_e4m3fn) with ``scales``; or
            int4 codes of every element in row-major order, packed two per byte, uint8 ``[ceil(rows·cols / 2)]``.
        scales: for codes, ``[rows]`` float16/bfloat16/float32 (value = code · ``scales[row]``), or for int4
            ``[rows, ceil(cols / group_size)]`` (value = code · ``scales[row, col // group_size]``); else None.

    Scalars:
        shape: ``(rows, cols)``; group_size: columns per int4 scale, else None.
    """

    values: torch.Tensor
    shape: tuple[int, int]
    scales: torch.Tensor | None = None
    group_size: int | None = None

    layout: ClassVar[str] = "dense"
    parts: ClassVar[tuple[str, ...]] = ("values",)
    options: ClassVar[tuple[str, ...]] = ("group_size",)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, *, dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None, group_size: int | None = None) -> DenseMatrix:
        """Store ``matrix`` ([rows, cols], floating) with values cast to ``dtype`` (default: its own dtype); with
        ``scales`` (``[rows]``), ``matrix`` holds codes (int8, float8_e4m3fn), stored with their row scales; with
        ``group_size`` too, int4 codes (int8 in [-7, 7]) with scales ``[rows, ceil(cols / group_size)]``."""
        values = check_matrix(matrix, dtype, scales, group_size)
        shape = (values.shape[0], values.shape[1])
        if group_size is not None:
            values = pack_int4(values)
        return cls(values=values, shape=shape, scales=scales, group_size=group_size)

    @cached_property
    def nnz(self) -> int:
        """Number of non-zero values."""
        if self.group_size is not None:
            return count_nonzero(unpack_int4(self.values, 0, self.shape[0] * self.shape[1]))
        return count_nonzero(self.values)

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if self.group_size is not None:
            cols = self.shape[1]
            return self._stored_values(start * cols, stop * cols).view(stop - start, cols).to(dtype)
        return self.values[start:stop].to(dtype)

    def kernel_ready(self, device: torch.device) -> bool:
        """True on CUDA devices where the Triton kernels run: a dense factor then joins their chain (cuBLAS, the
        "prefill" path). On the CPU its pure-torch ``matmul`` is the same product."""
        from dsf_runtime.kernels import unavailable_reason

        return torch.device(device).type == "cuda" and self.scales is None and unavailable_reason(device) is None

    def validate(self, prefix: str = "") -> None:
        """Check dtypes and shapes; raises FormatError naming ``<prefix>.values`` or ``<prefix>.scales``."""
        check_scales(part_name(prefix, "scales"), self.values, self.scales, self.shape, self.group_size)
        if self.group_size is not None:
            check_int4_values(part_name(prefix, "values"), self.values, self.shape[0] * self.shape[1])
        else:
            check_tensor(part_name(prefix, "values"), self.values, (*VALUE_DTYPES, *CODE_DTYPES), self.shape)

