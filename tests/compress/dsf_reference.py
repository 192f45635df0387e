"""Test oracle: a straightforward port of ``usamec/double_sparse`` ``doublesparse.py`` (run in float64 by the tests).

Kept structurally identical to the reference: ``torch.inverse``, full sorts, all 5 inner ADMM solves (the last
one's result is discarded), ``finalize`` taking its mask from ``Ab != 0``, no dead-input handling. Only the mask
rule is selectable:

* ``selection="exact"`` keeps exactly ``nnz`` entries (threshold ``sort(|x|)[numel − nnz]`` with ``>=``), and the
  half-budget initialization keeps ``nzb // 2``; this is the solver's documented deviation, so with it the solver
  must reproduce this port;
* ``selection="reference"`` is the original rule: ``sort(|x|)[int(numel·min(0.99, 1 − nnz/numel))]`` with a
  strict ``>``.
"""

from __future__ import annotations

from typing import Literal

import torch

Selection = Literal["exact", "reference"]


def _mask(values: torch.Tensor, nnz: int, selection: Selection) -> torch.Tensor:
    magnitudes = values.abs()
    ordered = magnitudes.flatten().sort()[0]
    if selection == "reference":
        sparsity = min(0.99, 1 - nnz / values.numel())
        return magnitudes > ordered[int(values.numel() * sparsity)]
    return magnitudes >= ordered[values.numel() - nnz]


def find_other2(A, W, nnz, Z, U, reg, rho_start, selection, iters=5, prune_iters=2, fixmask=None):
    XX = A.T.matmul(A)
    norm2 = torch.diag(XX).sqrt() + 1e-8
    An = A / norm2
    XX = An.T.matmul(An)
    XX += torch.diag(torch.ones_like(XX.diag())) * XX.diag().mean() * reg
    rho = 1
    XY = An.T.matmul(W)
    eye = torch.eye(XX.shape[1], dtype=XX.dtype, device=XX.device)
    XXinv = torch.inverse(XX + eye * rho)
    XXinv2 = torch.inverse(XX + eye * rho_start)
    U = U * norm2.unsqueeze(1)
    Z = Z * norm2.unsqueeze(1)
    B = XXinv2.matmul(XY + rho_start * (Z - U))
    for itt in range(iters):
        if itt < prune_iters and fixmask is None:
            mask = _mask(B + U, nnz, selection)
        if fixmask is not None:
            mask = fixmask
        Z = (B + U) * mask
        U = U + (B - Z)
        B = XXinv.matmul(XY + rho * (Z - U))
    return Z / norm2.unsqueeze(1), U / norm2.unsqueeze(1)


def _init_rect(Wn, nzb, selection):
    if selection == "reference":  # mag_prune(Wn, 1 - nzb/2/numel)
        sp = 1 - nzb / 2 / Wn.numel()
        thres = Wn.abs().flatten().sort()[0][int(Wn.numel() * sp)]
        return Wn * (Wn.abs() > thres)
    return Wn * _mask(Wn, nzb // 2, "exact")


def _factorize_core(W, norm, asp, sp, iters, fixmask, selection):
    """The common body of ``factorizef`` and ``factorizeT`` (``norm`` broadcasts over W's input side)."""
    nza = int(W.shape[0] ** 2 * asp) if fixmask is None else int((fixmask != 0).sum())
    nzb = int(W.numel() * sp - nza)
    Wn = W * norm
    Az = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    Au = torch.zeros_like(Az)
    Bz = _init_rect(Wn, nzb, selection)
    Bu = torch.zeros_like(Bz)
    for itt in range(iters):
        rho_start = min(1.0, itt / (iters - 3)) ** 3
        Az, Au = (x.T for x in find_other2(Bz.T, Wn.T, nza, Az.T, Au.T, 1e-2, rho_start, selection, fixmask=fixmask))
        Bz, Bu = find_other2(Az, Wn, nzb, Bz, Bu, 1e-2, rho_start, selection)
    return Az, Bz


def factorizef(W, XX, asp, sp, iters=40, fixmask=None, selection: Selection = "exact"):
    """Returns ``(W2, A, B)`` with ``W2 = A @ B``."""
    if W.shape[0] >= W.shape[1]:
        Az, Bz = _factorize_core(W.T, XX.diag().sqrt().unsqueeze(1) + 1e-8, asp, sp, iters, fixmask, selection)
        norm = XX.diag().sqrt().unsqueeze(1) + 1e-8
        return ((Az / norm).matmul(Bz)).T, Bz.T, (Az / norm).T
    norm = XX.diag().sqrt() + 1e-8
    Az, Bz = _factorize_core(W, norm, asp, sp, iters, fixmask, selection)
    return Az.matmul(Bz / norm), Az, Bz / norm


def finalize(XXb, W, Ab, Bb, iters=20):
    mask = (Ab != 0).T
    XX = Bb.matmul(XXb).matmul(Bb.T)
    XY = Bb.matmul(XXb).matmul(W.T)
    norm2 = torch.diag(XX).sqrt() + 1e-8
    XX = XX / norm2 / norm2.unsqueeze(1)
    XY = XY / norm2.unsqueeze(1)
    Ax = (Ab * norm2).T.clone()
    rho = 1
    XXinv = torch.inverse(XX + torch.eye(XX.shape[1], dtype=XX.dtype, device=XX.device) * rho)
    U = torch.zeros_like(Ax)
    for _ in range(iters):
        Z = (Ax + U) * mask
        U = U + (Ax - Z)
        Ax = XXinv.matmul(XY + rho * (Z - U))
    return Z.T / norm2


def factorize(
    W, XX, density, nofinal=False, fixmask=None, iters=40, finalize_iters=20, selection: Selection = "exact"
):
    """The reference's ``factorize`` (``density = 1 − sparsity``). Returns ``(W3, A, B)``."""
    asp = 0.16 if W.shape[0] == W.shape[1] else 0.25
    W2, Ab, Bb = factorizef(W, XX, asp, density, iters=iters, fixmask=fixmask, selection=selection)
    if nofinal:
        return W2, Ab, Bb
    Ac = finalize(XX, W, Ab, Bb, iters=finalize_iters)
    return Ac.matmul(Bb), Ac, Bb


def synthetic_layer(out_features, in_features, *, samples=512, outliers=4, rank=8, seed=0, dtype=torch.float64):
    """A layer like the doc's synthetic check: inputs with correlated columns and ``outliers`` loud channels,
    a weight with a rank-``rank`` component. Returns ``(W [out, in], H [in, in] = 2·XᵀX/samples)``."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, in_features, generator=generator, dtype=dtype)
    mixing = torch.randn(in_features, in_features, generator=generator, dtype=dtype) / in_features**0.5
    inputs = base + base @ mixing
    inputs[:, :outliers] *= 10
    hessian = 2 * inputs.T @ inputs / samples
    noise = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    low_rank = torch.randn(out_features, rank, generator=generator, dtype=dtype) @ torch.randn(
        rank, in_features, generator=generator, dtype=dtype
    )
    return (noise + low_rank) / in_features**0.5, hessian
