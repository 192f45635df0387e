"""Balanced factors at run time: ``balanced_per_group`` recognizes a factor solved with ``N`` non-zeros in every
group of ``G`` consecutive columns (the split itself is chosen at compression time, ``compress.solvers.split``).
"""

from __future__ import annotations

import torch

__all__ = ["balanced_per_group"]

GROUP = 16  # columns per group of the GPU kernels' balanced (nibble) layout


def balanced_per_group(matrix: torch.Tensor, group: int = GROUP) -> int | None:
    """``N`` when every non-empty row of ``matrix`` [rows, cols] holds exactly ``N < group`` non-zeros in each
    full group of ``group`` consecutive columns (a factor solved with ``group_size=group``), else None."""
    rows, cols = matrix.shape
    full = cols // group * group
    if full == 0:
        return None
    counts = (matrix[:, :full] != 0).reshape(rows, -1, group).sum(-1)
    counts = counts[counts.any(dim=1)]
    if counts.numel() == 0 or not bool((counts == counts[0, 0]).all()):
        return None
    per_group = int(counts[0, 0])
    return per_group if per_group < group else None
