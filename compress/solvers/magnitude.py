"""Global magnitude pruning: keep the ``int(out·in·density)`` largest ``|W_ij|`` of the matrix (data-free).

N:M keeps the ``prune_n`` largest of every ``prune_m`` consecutive inputs of a row. The Hessian is only used to
report the layer error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from compress.solvers.base import (
    NMConfig,
    SolveResult,
    check_nm_shape,
    elapsed,
    make_result,
    nm_mask,
    nnz_budget,
    topk_mask,
    validate_layer,
)

__all__ = ["MagnitudeConfig", "solve_magnitude"]


@dataclass(frozen=True)
class MagnitudeConfig(NMConfig):
    """Magnitude-pruning options: ``density``, ``prune_n``, ``prune_m`` (see ``NMConfig``)."""

    method: str = field(default="magnitude", init=False)


@torch.no_grad()
def solve_magnitude(
    weight: torch.Tensor, hessian: torch.Tensor, config: MagnitudeConfig, *, layer_name: str | None = None
) -> SolveResult:
    """Magnitude-prune one layer to exactly ``int(out·in·density)`` non-zeros (or exact N:M).

    Args:
        weight: W [out, in], any float dtype (float64 computes in float64, otherwise fp32).
        hessian: H [in, in], for the reported error only.
        config: magnitude options.
        layer_name: put into error messages.

    Returns:
        ``SolveResult`` of kind ``"single"`` with factor ``W`` [out, in] (the kept original weights) and its mask.

    Raises:
        ValueError: for invalid inputs (or in_features not a multiple of prune_m).
    """
    original, hess = validate_layer(weight, hessian, layer_name)
    check_nm_shape(original, config.prune_m, layer_name)
    start = time.perf_counter()
    if config.prune_m:
        mask = nm_mask(original.abs(), config.prune_n, config.prune_m)
    else:
        budget = nnz_budget(original.shape, config.density)
        mask = topk_mask(original.abs().flatten(), budget).view_as(original)
    pruned = original * mask
    seconds = elapsed(start, original.device)
    return make_result("single", {"W": pruned}, {"W": mask}, original, hess, seconds)
