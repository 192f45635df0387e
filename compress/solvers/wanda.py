"""Wanda (Sun et al. 2023): prune by ``|W_ij|·‖x_j‖`` within each output row; no weight update.

The ``locuslab/wanda`` metric is ``|W_ij|·sqrt(‖x_j‖²/N)``; with ``H = (2/N)·Σ xxᵀ`` this is
``|W_ij|·sqrt(H_jj)`` up to a positive constant, which selects the same mask.

Exact budget (a deviation from the reference's ``int(in·sparsity)`` pruned per row): the layer keeps exactly
``budget = int(out·in·density)`` weights; every row keeps ``budget // out`` and the first ``budget % out`` rows
keep one more. N:M keeps the ``prune_n`` highest-metric weights of every ``prune_m`` consecutive inputs of a row.
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
    validate_layer,
)

__all__ = ["WandaConfig", "solve_wanda"]


@dataclass(frozen=True)
class WandaConfig(NMConfig):
    """Wanda options: ``density``, ``prune_n``, ``prune_m`` (see ``NMConfig``)."""

    method: str = field(default="wanda", init=False)


def _row_budget_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the highest scores of each row, ``budget`` in total: ``budget // rows`` per row, one more in the first
    ``budget % rows`` rows.

    Args:
        scores: [rows, cols] float.
        budget: total kept, ``0 <= budget <= rows·cols``.

    Returns:
        bool [rows, cols] with exactly ``budget`` True.
    """
    rows, cols = scores.shape
    base, extra = divmod(budget, rows)
    width = min(base + 1, cols)
    order = scores.topk(width, dim=1).indices  # [rows, width], best first
    per_row = torch.full((rows, 1), base, device=scores.device)
    per_row[:extra] += 1
    keep = torch.arange(width, device=scores.device).unsqueeze(0) < per_row
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, keep)


@torch.no_grad()
def solve_wanda(
    weight: torch.Tensor, hessian: torch.Tensor, config: WandaConfig, *, layer_name: str | None = None
) -> SolveResult:
    """Wanda-prune one layer to exactly ``int(out·in·density)`` non-zeros (or exact N:M).

    Args:
        weight: W [out, in], any float dtype (float64 computes in float64, otherwise fp32).
        hessian: H [in, in]; only its diagonal is used.
        config: Wanda options.
        layer_name: put into error messages.

    Returns:
        ``SolveResult`` of kind ``"single"`` with factor ``W`` [out, in] (the kept original weights) and its mask.

    Raises:
        ValueError: for invalid inputs (or in_features not a multiple of prune_m).
    """
    original, hess = validate_layer(weight, hessian, layer_name)
    check_nm_shape(original, config.prune_m, layer_name)
    start = time.perf_counter()
    metric = original.abs() * hess.diagonal().clamp(min=0).sqrt()
    if config.prune_m:
        mask = nm_mask(metric, config.prune_n, config.prune_m)
    else:
        mask = _row_budget_mask(metric, nnz_budget(original.shape, config.density))
    pruned = original * mask
    seconds = elapsed(start, original.device)
    return make_result("single", {"W": pruned}, {"W": mask}, original, hess, seconds)
