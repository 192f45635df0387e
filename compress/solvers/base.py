"""The one interface every layer solver implements.

A solver takes a layer's weight ``W`` (out × in) and the calibration Hessian ``H = (2/N)·Σ xxᵀ`` (in × in) and
returns the compressed weight as factors: ``{"A": [out, k], "B": [k, in]}`` for DSF (``W ≈ A·B``) or
``{"W": [out, in]}`` for single-sparse methods, together with their non-zero count and the layer error
``tr(ΔW·H·ΔWᵀ)``. Solvers never print, never touch a model, and compute in fp32 on the device of ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["SolveResult", "layer_error", "nnz_budget"]

FactorKind = Literal["dsf", "single"]


@dataclass(frozen=True)
class SolveResult:
    """Result of compressing one layer.

    Attributes:
        kind: ``"dsf"`` (factors ``A`` [out, k] and ``B`` [k, in]) or ``"single"`` (factor ``W`` [out, in]).
        factors: the factor matrices, fp32, zeros where pruned.
        nnz: total non-zeros over all factors.
        error: ``tr(ΔW·H·ΔWᵀ)`` of the product against the original weight.
        relative_error: ``error / tr(W·H·Wᵀ)``.
        seconds: wall time of the solve (device-synchronized).
    """

    kind: FactorKind
    factors: dict[str, torch.Tensor]
    nnz: int
    error: float
    relative_error: float
    seconds: float

    def weight(self) -> torch.Tensor:
        """The dense weight the factors represent, [out, in] fp32."""
        if self.kind == "dsf":
            return self.factors["A"] @ self.factors["B"]
        return self.factors["W"]


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> tuple[float, float]:
    """Layer reconstruction error ``tr(ΔW·H·ΔWᵀ)`` and its ratio to ``tr(W·H·Wᵀ)``.

    Args:
        weight: original W, [out, in].
        approx: compressed Ŵ, [out, in].
        hessian: H, [in, in], symmetric positive semi-definite.

    Returns:
        ``(error, relative_error)`` as Python floats, computed in float64.
    """
    w = weight.double()
    h = hessian.double().to(w.device)
    delta = approx.double().to(w.device) - w
    err = torch.einsum("oi,ij,oj->", delta, h, delta).item()
    ref = torch.einsum("oi,ij,oj->", w, h, w).item()
    return err, err / ref if ref > 0 else float("inf")


def nnz_budget(shape: tuple[int, int] | torch.Size, density: float) -> int:
    """Total non-zeros allowed for a layer of ``shape`` at ``density``: ``int(out·in·density)``,
    the single-matrix budget that DSF's two factors share."""
    return int(shape[0] * shape[1] * density)
