"""Basis convolutions (Alekseev et al., arXiv 2408.06024): keep ``p`` of a layer's ``out`` filters, compute the
other output channels as linear combinations of the basis outputs (a ``1×1`` coefficient conv).

**Everything here is [inferred]** (``docs/dsf-algorithm.md`` §3.2): the paper's own selection and fitting
procedures were not available. This is the most faithful reading of its abstract:

* convolution is linear in the filter, so with basis filters ``W_S`` ``[p, in·kh·kw]`` and coefficients ``Λ``
  ``[out − p, p]`` the remaining outputs are ``Y_r = Λ·Y_S``: parameters ``p·in·kh·kw + (out − p)·p``;
* the error of a choice is data-aware, ``Σ_{i∉S} ‖w_i − λ_i·W_S‖²_H`` with ``H`` the unfolded-input Hessian
  (``H = I`` is the plain filter-space error). It depends on the weights only through the Gram matrix
  ``G = W·H·Wᵀ`` ``[out, out]``, so selection and fitting work on ``G`` alone;
* selection ``"greedy"`` (default): forward selection that adds, at each step, the filter whose inclusion lowers
  the total error most (error drop ``‖G_r[:, j]‖² / G_r[j, j]`` on the residual Gram matrix ``G_r``, deflated after
  each pick; the exact greedy for column-subset selection). ``"qr"``: column-pivoted QR of ``H^{1/2}·Wᵀ``
  (equivalently pivoted Cholesky of ``G``): pick the filter with the largest residual norm;
* coefficients: the least-squares optimum ``Λ = G[r, S]·G[S, S]⁻¹`` (float64, a ``1e-10``-relative ridge against
  dependent basis filters);
* optional short fine-tuning of basis and coefficients: ``compress.conv.finetune``.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from torch import nn

from compress.solvers.base import layer_error
from dsf_runtime.conv import CompressedConv, ConvGeometry, geometry_of

__all__ = ["SELECTIONS", "basis_conv", "basis_params", "basis_size_for_params", "fit_coefficients", "select_basis"]

logger = logging.getLogger(__name__)

Selection = Literal["greedy", "qr"]
SELECTIONS = ("greedy", "qr")
_RIDGE = 1e-10  # relative ridge of the coefficient normal equations
_TINY = 1e-12  # residual norms below this fraction of the largest initial one count as zero


def basis_params(geometry: ConvGeometry, n_basis: int) -> int:
    """Weights of a basis convolution: ``p·in·kh·kw + (out − p)·p``."""
    return n_basis * geometry.fan_in + (geometry.out_channels - n_basis) * n_basis


def basis_size_for_params(geometry: ConvGeometry, params: int, name: str | None = None) -> int:
    """The largest basis size ``p`` whose ``basis_params`` do not exceed ``params``.

    Raises:
        ValueError: not even one basis filter fits (naming the layer and the minimum).
    """
    best = 0
    for p in range(1, geometry.out_channels + 1):
        if basis_params(geometry, p) <= params:
            best = p
    if best == 0:
        where = f"layer {name!r}: " if name else ""
        raise ValueError(
            f"{where}a budget of {params} weights cannot hold one basis filter (needs {basis_params(geometry, 1)}); "
            "raise the budget or keep this layer dense"
        )
    return best


def select_basis(gram: torch.Tensor, n_basis: int, selection: Selection = "greedy") -> list[int]:
    """Choose ``n_basis`` filters from the Gram matrix ``G = W·H·Wᵀ`` ``[out, out]``.

    Returns:
        The chosen output channels, in selection order. Once the residual is zero (``rank(G) < n_basis``) the
        remaining picks are the unchosen filters of largest norm.
    """
    residual = gram.double().clone()
    out = residual.shape[0]
    norms = residual.diagonal().clone()
    floor = _TINY * float(norms.max()) if out else 0.0
    chosen: list[int] = []
    for _ in range(n_basis):
        diag = residual.diagonal()
        live = diag > floor
        if chosen:
            live[chosen] = False
        if not bool(live.any()):
            rest = norms.clone()
            rest[chosen] = -1.0
            chosen.extend(rest.argsort(descending=True)[: n_basis - len(chosen)].tolist())
            break
        score = residual.square().sum(0) / diag if selection == "greedy" else diag.clone()
        score[~live] = -torch.inf
        j = int(score.argmax())
        chosen.append(j)
        column = residual[:, j] / diag[j].sqrt()
        residual -= torch.outer(column, column)
    return chosen


def fit_coefficients(gram: torch.Tensor, basis: list[int]) -> torch.Tensor:
    """Least-squares coefficients ``Λ = G[r, S]·G[S, S]⁻¹`` ``[out − p, p]`` (float64) for the non-basis channels
    ``r`` (ascending) in terms of the basis channels ``S`` (in the given order)."""
    g = gram.double()
    chosen = set(basis)
    rest = [c for c in range(g.shape[0]) if c not in chosen]
    g_ss = g[basis][:, basis]
    ridge = _RIDGE * float(g_ss.diagonal().mean()) if basis else 0.0
    g_ss = g_ss + ridge * torch.eye(len(basis), dtype=g.dtype, device=g.device)
    return torch.linalg.solve(g_ss, g[basis][:, rest]).T if rest else g.new_zeros(0, len(basis))


@torch.no_grad()
def basis_conv(
    module: nn.Conv2d,
    n_basis: int,
    hessian: torch.Tensor | None = None,
    *,
    selection: Selection = "greedy",
    name: str | None = None,
) -> CompressedConv:
    """Turn a convolution into a basis convolution with ``n_basis`` filters.

    Args:
        module: a supported ``Conv2d``, weight ``[out, in, kh, kw]``.
        n_basis: basis filters ``p``, ``1 <= p <= out`` (``p == out`` keeps the layer exactly).
        hessian: ``[in·kh·kw, in·kh·kw]`` from ``collect_hessians``; None = data-free (``H = I``).
        selection: ``"greedy"`` or ``"qr"`` (module docstring).
        name: the layer's name, for errors.

    Returns:
        A ``CompressedConv`` of kind ``basis_conv`` (layout ``dense``, fp32) with the layer error
        ``tr(ΔW·H·ΔWᵀ)`` (``H = I`` when data-free).

    Raises:
        ValueError: the module is unsupported, ``n_basis`` is out of range, or ``selection`` is unknown.
    """
    geometry = geometry_of(module, name)
    where = f"layer {name!r}: " if name else ""
    if selection not in SELECTIONS:
        raise ValueError(f"{where}selection must be one of {SELECTIONS}, got {selection!r}")
    out = geometry.out_channels
    if isinstance(n_basis, bool) or not isinstance(n_basis, int) or not 1 <= n_basis <= out:
        raise ValueError(
            f"{where}a basis of {n_basis!r} filters does not fit a layer with {out} output channels; "
            f"pass 1 <= n_basis <= {out}"
        )
    start = time.perf_counter()
    weight = module.weight.detach().reshape(out, geometry.fan_in).double()
    if hessian is None:
        hessian = torch.eye(geometry.fan_in, dtype=torch.float64, device=weight.device)
    elif tuple(hessian.shape) != (geometry.fan_in, geometry.fan_in):
        raise ValueError(
            f"{where}hessian has shape {tuple(hessian.shape)}, expected ({geometry.fan_in}, {geometry.fan_in}) "
            "(in·kh·kw of this layer); pass the H of this layer's unfolded input"
        )
    hessian = hessian.to(weight.device, torch.float64)
    gram = weight @ hessian @ weight.T
    basis = select_basis(gram, n_basis, selection)
    coeff = fit_coefficients(gram, basis)
    approx = weight.clone()
    rest = [c for c in range(out) if c not in set(basis)]
    approx[rest] = coeff @ weight[basis]
    error, relative = layer_error(weight, approx, hessian)
    logger.debug("%s%d/%d basis filters, relative error %.4g (%.2f s)", where, n_basis, out, relative,
                 time.perf_counter() - start)
    bias = None if module.bias is None else module.bias.detach().float()
    return CompressedConv.from_dense(
        "basis_conv", {"basis": weight[basis].float(), "coeff": coeff.float()}, geometry=geometry,
        method="basis", bias=bias, error=error, relative_error=relative, basis_channels=basis,
    )
