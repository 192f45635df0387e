"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight updates, one sparse matrix per layer.

Faithful to ``IST-DASLab/sparsegpt`` ``SparseGPT.fasterprune``: dead inputs get ``H_jj = 1`` and a zero column;
``H`` is damped by ``percdamp·mean(diag H)``; ``Hinv`` is the upper Cholesky factor of ``H⁻¹``; columns are
processed in blocks of ``blocksize``; the unstructured mask of a block is chosen once, on the block's current
(already updated) weights, by the saliency ``w²/[Hinv]_jj²``; every pruned weight's error is spread over the
remaining columns (``W[:, i:] −= err·Hinv[i, i:]``).

Deviations:

* exact budget: the reference prunes ``int(numel·sparsity) + 1`` weights of each block (``<=`` the threshold),
  so per-block rounding drifts from the layer budget. Here block ``[i1, i2)`` keeps exactly
  ``⌊budget·i2/n⌋ − ⌊budget·i1/n⌋`` weights (``budget = int(m·n·density)``); these sum to exactly ``budget``;
* N:M: ``prune_n`` is the number **kept** in every group of ``prune_m`` consecutive input weights of a row
  (the usual N:M meaning). The reference's ``prunen`` counts pruned weights; the two agree for 2:4 and 4:8.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from compress.solvers.base import (
    NMConfig,
    SolveResult,
    check_nm_shape,
    damp,
    elapsed,
    exact_fp32,
    layer_prefix,
    make_result,
    nm_mask,
    nnz_budget,
    remove_dead_inputs,
    topk_mask,
    validate_layer,
)

__all__ = ["SparseGPTConfig", "solve_sparsegpt"]


@dataclass(frozen=True)
class SparseGPTConfig(NMConfig):
    """SparseGPT options (defaults: the reference's).

    Attributes:
        density: kept fraction, in (0, 1]; must equal ``prune_n/prune_m`` for N:M.
        blocksize: columns per block (mask selection and lazy update granularity).
        percdamp: damping of H as a fraction of its mean diagonal.
        prune_n: for N:M sparsity, weights kept in every group of ``prune_m`` (0 = unstructured).
        prune_m: N:M group size (0 = unstructured); must divide ``blocksize`` and the layer's in_features.
    """

    method: str = field(default="sparsegpt", init=False)
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize} (the reference uses 128)")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r} (the reference uses 0.01)")
        if self.prune_m and self.blocksize % self.prune_m:
            raise ValueError(
                f"blocksize={self.blocksize} must be a multiple of prune_m={self.prune_m} so N:M groups do not "
                "straddle blocks"
            )


def inverse_cholesky(hessian: torch.Tensor, percdamp: float, layer_name: str | None) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + percdamp·mean(diag H)·I)⁻¹`` [n, n].

    Raises:
        RuntimeError: if the damped H is not positive definite (raise percdamp), naming the layer.
    """
    factor, info = torch.linalg.cholesky_ex(damp(hessian, percdamp))
    if int(info) == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info) != 0:
        raise RuntimeError(
            f"{layer_prefix(layer_name)}SparseGPT: the damped Hessian is not positive definite "
            f"(percdamp={percdamp}); raise percdamp"
        )
    return factor


def _prune_block(
    block: torch.Tensor, hinv_block: torch.Tensor, keep: int, prune_n: int, prune_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune one column block with OBS updates inside the block.

    Args:
        block: current weights of the block [m, c] (updated in place).
        hinv_block: ``Hinv[i1:i2, i1:i2]`` [c, c].
        keep: weights kept in the block (unstructured only).

    Returns:
        ``(Q, Err, kept)``: pruned-and-updated block [m, c], scaled errors [m, c], kept mask [m, c].
    """
    count = block.shape[1]
    diag = torch.diagonal(hinv_block)
    if prune_m:
        kept = torch.zeros_like(block, dtype=torch.bool)
    else:
        kept = topk_mask((block**2 / diag**2).flatten(), keep).view_as(block)
    pruned = block.new_zeros(block.shape)
    errors = torch.zeros_like(block)
    for i in range(count):
        if prune_m and i % prune_m == 0:
            saliency = block[:, i : i + prune_m] ** 2 / diag[i : i + prune_m] ** 2
            kept[:, i : i + prune_m] = nm_mask(saliency, prune_n, prune_m)
        w = block[:, i]
        q = w * kept[:, i]
        pruned[:, i] = q
        err = (w - q) / diag[i]
        block[:, i:] -= err.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)
        errors[:, i] = err
    return pruned, errors, kept


@torch.no_grad()
def solve_sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, config: SparseGPTConfig, *, layer_name: str | None = None
) -> SolveResult:
    """SparseGPT-prune one layer to exactly ``int(out·in·density)`` non-zeros (or exact N:M).

    Args:
        weight: W [out, in], any float dtype (float64 computes in float64, otherwise fp32).
        hessian: H [in, in] = (2/N)·Σ xxᵀ of the layer input.
        config: SparseGPT options.
        layer_name: put into error messages.

    Returns:
        ``SolveResult`` of kind ``"single"`` with factor ``W`` [out, in], its mask and the error.

    Raises:
        ValueError: for invalid inputs (or in_features not a multiple of prune_m).
        RuntimeError: if the damped H is not positive definite.
    """
    original, hess = validate_layer(weight, hessian, layer_name)
    check_nm_shape(original, config.prune_m, layer_name)
    columns = original.shape[1]
    budget = nnz_budget(original.shape, config.density)
    start = time.perf_counter()
    with exact_fp32():
        work, live_hessian = remove_dead_inputs(original, hess)
        hinv = inverse_cholesky(live_hessian, config.percdamp, layer_name)
        mask = torch.zeros_like(work, dtype=torch.bool)
        for i1 in range(0, columns, config.blocksize):
            i2 = min(i1 + config.blocksize, columns)
            keep = budget * i2 // columns - budget * i1 // columns
            pruned, errors, kept = _prune_block(
                work[:, i1:i2].clone(), hinv[i1:i2, i1:i2], keep, config.prune_n, config.prune_m
            )
            work[:, i1:i2] = pruned
            mask[:, i1:i2] = kept
            work[:, i2:] -= errors @ hinv[i1:i2, i2:]
    seconds = elapsed(start, work.device)
    return make_result("single", {"W": work}, {"W": mask}, original, hess, seconds)
