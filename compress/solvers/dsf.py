"""Double Sparse Factorization (DSF): ``W ≈ A·B`` with two sparse factors sharing the single-matrix budget.

Faithful to ``usamec/double_sparse`` ``doublesparse.py`` (``factorize``, ``factorizef``, ``factorizeT``,
``find_other2``, ``finalize``; see ``docs/dsf-algorithm.md`` §1.2–1.5 and §4.1):

* inner dimension ``k = min(m, n)`` for ``W`` [m, n]; one factor is square ``k×k``. For ``m < n`` the square
  factor is on the output side (``A`` [m, m], ``B`` [m, n]); for ``m >= n`` (square layers included) the code
  factorizes ``Wᵀ`` and the square factor ends up on the input side (``A`` [m, n], ``B`` [n, n]);
* budget ``nnz(A) + nnz(B) = int(m·n·density)``: the square factor gets ``int(k²·square_density)``
  (0.16 for square W, 0.25 otherwise), the other factor the rest;
* stage 1 minimizes ``‖W·diag(s) − A·B̂‖_F`` with ``s = sqrt(diag H) + 1e-8`` by 40 alternating sparse
  least-squares updates (square factor first), each 5 ADMM steps in column-normalized coordinates with the
  global magnitude mask re-chosen in the first 2; ``B = B̂·diag(s)⁻¹``;
* stage 2 (``finalize``) refits the left/output factor ``A`` on its fixed support under the full-H objective
  ``tr((A·B − W)·H·(A·B − W)ᵀ)`` with 20 ADMM steps.

CNN extras (``other_experiments/OBC-x*.ipynb``, §1.4 ``get_at`` and §1.6; off by default, so the LLM setting and
its results are unchanged): ``input_scaling=False`` factorizes the plain ``W`` (the notebooks' ``norm = ones``);
``square_density="cnn"`` gives the square factor density ``max(0.16, density/2)``; ``refit_right=True`` refits the
right/input factor ``B`` on its fixed support under the full H after ``finalize`` (the notebooks' ``get_at``: ADMM
with ρ = 1 whose least-squares step is the Sylvester equation ``G̃·X·H̃ + X = F``, solved with one eigendecomposition
of each normalized matrix). ``compress.conv.dsf_conv.CNN_DSF_OPTIONS`` bundles the notebooks' CNN setting
(200 outer iterations, 200 finalize steps, 20 refit steps).

Same results as the reference in exact arithmetic, faster: ``cholesky_ex`` + ``cholesky_inverse`` instead of
``torch.inverse`` (one factorization serves both shifts once ``rho_start = 1``; cuSOLVER preferred on CUDA);
exact top-k selection (``base.topk_mask``) instead of full sorts; the last ADMM step's least-squares solve,
whose result the reference discards, is skipped; ADMM updates are fused (``Z − U = (2·mask − 1)⊙(X + U)``,
``X + U`` accumulated by ``baddbmm``); no host synchronization inside the loops on CUDA (Cholesky failures are
checked once at the end); same-shape layers of up to 2^26 weights each are solved as one batch.

Deliberate deviations (each changes at most a handful of mask entries):

* masks keep **exactly** the budgeted count (top-``nnz``, ties broken arbitrarily). The reference thresholds at
  ``sort(|x|)[int(numel·sp)]`` with a strict ``>``, which keeps ``nnz − 1`` entries (or ``nnz``, depending on
  float rounding of ``numel·sp``), and caps the sparsity of each factor at 0.99; here a factor keeps exactly
  its budget, so the layer total is exactly ``int(m·n·density)``;
* the half-budget initialization of the rectangular factor keeps exactly ``nzb // 2`` entries;
* dead inputs (``H_jj == 0``) follow SparseGPT (``H_jj = 1``, ``W[:, j] = 0``) so nothing divides by 1e-8;
* ``rho_start = min(1, t/(iters − 3))³`` is evaluated with the denominator clamped to >= 1, which only matters
  for ``iters <= 3`` (where the reference divides by zero or goes negative);
* with ``fixmask`` the fixed mask keeps exactly ``int(k²·d)`` entries (``d`` = 0.1 square, 0.2 rectangular),
  at least ``k`` so the diagonal always fits;
* supports are tracked as masks (``finalize`` refits on ``A``'s mask, the reference on ``A != 0``; they differ
  only if a kept value is exactly zero), and ``SolveResult.nnz`` counts the masks;
* the density floor is ``nnz(R) >= 2`` (the reference breaks at ``nnz(R) < 0``): below that the half-budget
  initialization of ``R`` is empty and the first Gram matrix singular.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from compress.solvers.base import (
    SolveResult,
    SolverConfig,
    elapsed,
    exact_fp32,
    layer_prefix,
    make_result,
    nnz_budget,
    remove_dead_inputs,
    topk_mask,
    validate_layer,
)
from compress.solvers.products import MATMUL_PRECISIONS, MatmulPrecision, Products, SplitTF32
from compress.solvers.split import propose_balanced_split, square_factor_density

__all__ = ["BATCH_MAX_ELEMENTS", "DSFConfig", "solve_batches", "solve_dsf", "solve_dsf_group"]

_EPS = 1e-8  # added to column norms and to sqrt(diag H), as in the reference
_REG = 1e-2  # ridge on the normalized Gram matrix, times its mean diagonal
_INNER_ITERS = 5  # ADMM steps per factor update
_MASK_ITERS = 2  # ADMM steps (of the 5) that re-select the mask
# Same-shape layers are batched only up to this many weights each (8192² = 2^26): one larger layer already fills a
# GPU, so a batch of them only multiplies the peak memory and makes one long indivisible unit for scale-out.
BATCH_MAX_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class DSFConfig(SolverConfig):
    """DSF options (defaults: the LLM setting of the reference).

    Attributes:
        density: total kept fraction ``(nnz(A) + nnz(B)) / (m·n)``, in (0, 1]. The square factor's share is
            fixed, so too low a density leaves the other factor (almost) nothing; the solver raises then, naming
            the minimum density of the shape.
        iters: outer alternating iterations (40 in the reference).
        square_density: density of the square ``k×k`` factor; None = 0.16 for square W, else 0.25; ``"cnn"`` =
            ``max(0.16, density/2)`` (the CNN notebooks). Not with ``fixmask``.
        fixmask: fix the square factor's mask to a random mask (density 0.1 for square W, 0.2 otherwise, the
            diagonal always included) instead of selecting it; the reference's ``--fix-mask`` ablation.
        fixmask_seed: seed of that random mask; one seed gives one mask per shape, shared by all layers.
        finalize: refit the left/output factor ``A`` under the full H (the reference's default).
        finalize_iters: ADMM steps of that refit (20 in the reference).
        input_scaling: factorize ``W·diag(sqrt(diag H))`` (the LLM reference) instead of the plain ``W`` (False:
            the CNN notebooks).
        refit_right: after ``finalize``, refit the right/input factor ``B`` on its fixed support under the full H
            (the CNN notebooks' ``get_at``).
        refit_right_iters: ADMM steps of that refit (20 in the notebooks).
        group_size: None (the reference: one global magnitude mask per factor), or ``G`` in 2..16 for *balanced*
            factors: every row of each factor keeps exactly ``N`` non-zeros in each group of ``G`` consecutive
            columns (the GPU kernels' ``nibble`` layout; a last partial group of width ``w`` keeps
            ``min(N, w)``). ``N`` per factor comes from ``propose_balanced_split`` (the integer split closest to
            DSF's square/rectangular split whose total stays within the budget, so the total density is at most
            ``density``). The projection keeps the top ``N`` of ``|X + U|`` in each group instead of a global
            top-k; everything else is the reference algorithm. Not with ``fixmask``.
        matmul: precision of the large products (Gram matrices, right-hand sides, ADMM steps, the refit):
            ``"fp32"`` (the reference) or ``"3xtf32"``, error-compensated TF32 on tensor cores
            (``compress.solvers.products``; float32 weights only). Cholesky factorizations stay fp32. It keeps a
            TF32 head and tail of each operand, so a solve needs more memory than with fp32. On a CPU ``"3xtf32"``
            computes the same products 2–3× slower (it exists there to check accuracy).
    """

    method: str = field(default="dsf", init=False)
    iters: int = 40
    square_density: float | Literal["cnn"] | None = None
    fixmask: bool = False
    fixmask_seed: int = 0
    finalize: bool = True
    finalize_iters: int = 20
    input_scaling: bool = True
    refit_right: bool = False
    refit_right_iters: int = 20
    group_size: int | None = None
    matmul: MatmulPrecision = "fp32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters} (the reference uses 40)")
        if self.square_density is not None and self.square_density != "cnn" and not (
            isinstance(self.square_density, (int, float)) and 0 < self.square_density <= 1
        ):
            raise ValueError(
                f"square_density must be in (0, 1] or None (0.16 square / 0.25 rectangular) or 'cnn' "
                f"(max(0.16, density/2)), got {self.square_density!r}"
            )
        if self.finalize_iters < 1:
            raise ValueError(f"finalize_iters must be >= 1, got {self.finalize_iters} (the reference uses 20)")
        if self.refit_right_iters < 1:
            raise ValueError(f"refit_right_iters must be >= 1, got {self.refit_right_iters} (the notebooks use 20)")
        if self.group_size is not None and not 2 <= self.group_size <= 16:
            raise ValueError(
                f"group_size must be None or in 2..16 (4-bit in-group indices), got {self.group_size!r}"
            )
        if self.matmul not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul must be one of {', '.join(MATMUL_PRECISIONS)}, got {self.matmul!r}")
        if self.fixmask and self.group_size is not None:
            raise ValueError("fixmask and group_size exclude each other: a random fixed mask is not balanced")
        if self.fixmask and self.square_density is not None:
            raise ValueError(
                "square_density has no effect with fixmask=True (the fixed mask has density 0.1 for square W, "
                "0.2 otherwise); pass one of them"
            )


@dataclass(frozen=True)
class _Selection:
    """How a factor update chooses its support from ``|X + U|`` ([b, r, q] in the solver's coordinates).

    ``count`` entries per batch member: the global top-``count`` (the reference), or, with ``per_group``, the
    top ``per_group`` of each group of ``group`` consecutive entries along ``dim`` (balanced factors).
    """

    count: int
    per_group: int | None = None
    group: int = 16
    dim: int = -1

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool support [b, r, q] of ``scores`` (non-negative) [b, r, q]."""
        if self.per_group is None:
            return topk_mask(scores.flatten(1), self.count).view_as(scores)
        moved = scores.movedim(self.dim, -1)
        width = moved.shape[-1]
        # Padding below every score: a last group narrower than per_group keeps all its real entries.
        padded = torch.nn.functional.pad(moved, (0, -width % self.group), value=-1.0)
        mask = topk_mask(padded.unflatten(-1, (-1, self.group)), self.per_group).flatten(-2)[..., :width]
        return mask.movedim(-1, self.dim)


@dataclass(frozen=True)
class _Plan:
    """Factor shapes and budgets for one layer shape.

    ``M`` [k, q] is the matrix actually factorized as ``M ≈ S·R`` (``S`` square [k, k], ``R`` [k, q]):
    ``W·diag(s)`` when not ``transposed``, ``diag(s)·Wᵀ`` when ``transposed`` (``m >= n``).
    """

    transposed: bool
    k: int
    square: _Selection  # support of Sᵀ
    rect: _Selection  # support of R
    fixmask: torch.Tensor | None  # [k, k] bool support of Sᵀ, or None


def _fixed_mask_count(k: int, density: float) -> int:
    """Entries of the ``--fix-mask`` mask: ``int(k²·density)``, at least ``k`` so the diagonal fits."""
    return max(int(k * k * density), k)


def _fixed_mask(k: int, density: float, seed: int, device: torch.device) -> torch.Tensor:
    """The reference's ``--fix-mask``: a random [k, k] bool mask containing the diagonal (uniform scores + 100·I)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(k, k, generator=generator, dtype=torch.float64) + 100 * torch.eye(k, dtype=torch.float64)
    return topk_mask(scores.flatten(), _fixed_mask_count(k, density)).view(k, k).to(device)


def _plan(shape: torch.Size, config: DSFConfig, device: torch.device, layer_name: str | None) -> _Plan:
    """Budgets for a ``shape`` [m, n] layer.

    Raises:
        ValueError: when the square factor gets no non-zeros, or the density leaves the other factor none.
    """
    m, n = shape
    k = min(m, n)
    where = layer_prefix(layer_name)
    if config.square_density == "cnn":
        square_density = max(0.16, config.density / 2)
    else:
        square_density = config.square_density or square_factor_density(m, n)
    fixmask = None
    if config.fixmask:
        fixmask_density = 0.1 if m == n else 0.2
        fixmask = _fixed_mask(k, fixmask_density, config.fixmask_seed, device)
        nza = _fixed_mask_count(k, fixmask_density)
    else:
        nza = int(k * k * square_density)
    if nza < 1:
        raise ValueError(
            f"{where}square_density={square_density} leaves the {k}×{k} square factor no non-zeros; "
            "raise square_density"
        )
    budget = nnz_budget(shape, config.density)
    nzb = budget - nza
    if nzb < 2:  # the half-budget initialization of R needs at least one entry
        minimum = (nza + 2) / (m * n)
        raise ValueError(
            f"{where}density={config.density} is too low for DSF on a {m}×{n} layer: the {k}×{k} square factor "
            f"alone takes {nza} of the {budget} non-zeros; the minimum density is {minimum:.6g} "
            f"(maximum sparsity {1 - minimum:.6g}); raise the density or lower square_density"
        )
    transposed = m >= n
    if config.group_size is None:
        return _Plan(transposed, k, _Selection(nza), _Selection(nzb), fixmask)
    return _balanced_plan(shape, config, square_density, transposed, k, where)


def _balanced_plan(
    shape: torch.Size, config: DSFConfig, square_density: float, transposed: bool, k: int, where: str
) -> _Plan:
    """Budgets of balanced factors: ``N`` per group of ``config.group_size`` columns of each factor.

    The groups run along the columns of ``A`` [m, k] and ``B`` [k, n]. In the solver's coordinates
    (``Sᵀ`` and ``R``): ``A = S`` and ``B = R·diag(s)⁻¹`` (not transposed) put them along ``Sᵀ``'s rows and
    ``R``'s columns; ``A = Rᵀ`` and ``B = Sᵀ·diag(s)⁻¹`` (transposed) along ``R``'s rows and ``Sᵀ``'s columns.
    """
    group = config.group_size
    try:
        split = propose_balanced_split(tuple(shape), config.density, group, square_density)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    square_name, rect_name = ("A", "B") if split["square"] == "A" else ("B", "A")
    square = _Selection(split[f"nnz_{square_name}"], split[f"N_{square_name}"], group, -1 if transposed else -2)
    rect = _Selection(split[f"nnz_{rect_name}"], split[f"N_{rect_name}"], group, -2 if transposed else -1)
    return _Plan(transposed, k, square, rect, None)


def _spd_inverse(matrix: torch.Tensor, shift: float, failures: list[torch.Tensor]) -> torch.Tensor:
    """``(matrix + shift·I)⁻¹`` [b, r, r] by Cholesky; the failure flags are checked after the loops."""
    shifted = matrix.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(shift)
    factor, info = torch.linalg.cholesky_ex(shifted)
    failures.append(info)
    return torch.cholesky_inverse(factor)


def _admm(
    v: torch.Tensor,
    inverse: torch.Tensor,
    rhs: torch.Tensor,
    steps: int,
    mask: torch.Tensor | None,
    select: _Selection | None,
    products: Products,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ADMM with ρ = 1 for ``min ½xᵀGx − rhsᵀx`` s.t. support(x) ⊆ mask, i.e. the reference's loop::

        for step: Z = (X + U)·mask;  U = U + X − Z;  X = (G + I)⁻¹(rhs + Z − U)

    written on ``V = X + U``: ``U = V·(1 − mask)``, ``Z − U = (2·mask − 1)·V`` and the next ``V`` is
    ``U + (G + I)⁻¹(rhs + Z − U)`` (one fused ``baddbmm``). The last step's solve, which the reference computes
    and discards, is skipped.

    Args:
        v: ``X + U`` before the first step [b, r, q].
        inverse: ``(G + I)⁻¹`` [b, r, r], or its ``products.split``.
        rhs: [b, r, q].
        steps: ADMM steps.
        mask: fixed bool support (broadcastable to ``v``); None when ``select`` is given.
        select: if given, the mask is chosen from ``|V|`` by this selection, re-selected in the first
            ``_MASK_ITERS`` steps and then kept.
        products: the precision of the products.

    Returns:
        ``(Z, U, mask)`` after the last step.
    """
    if mask is not None:
        keep, drop, sign = _mask_weights(mask, v.dtype)
    for step in range(steps):
        if select is not None and step < _MASK_ITERS:
            mask = select.mask(v.abs())
            keep, drop, sign = _mask_weights(mask, v.dtype)
        u = v * drop
        if step < steps - 1:
            v = products.baddbmm(u, inverse, torch.addcmul(rhs, v, sign), inplace=True)  # u is rebuilt next step
    return v * keep, u, mask.expand_as(v)


def _mask_weights(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, 1 − mask, 2·mask − 1)`` as ``dtype`` (multiplying is much faster than ``torch.where`` on CPU)."""
    keep = mask.to(dtype)
    return keep, 1 - keep, 2 * keep - 1


def _sparse_ls(
    design_t: torch.Tensor,
    target: torch.Tensor | SplitTF32,
    z: torch.Tensor,
    u: torch.Tensor,
    selection: _Selection,
    rho_start: float,
    fixmask: torch.Tensor | None,
    failures: list[torch.Tensor],
    products: Products,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's ``find_other2``: ``min_X ‖target − design·X‖_F`` on a sparse support by warm ADMM.

    Args:
        design_t: ``designᵀ`` [b, r, p] (the transpose is what the products need).
        target: [b, p, q], or its ``products.split`` (split once per solve).
        z: previous sparse iterate [b, r, q] (unscaled coordinates).
        u: previous scaled dual [b, r, q] (unscaled coordinates).
        selection: how the support is chosen (entries kept per batch member; global or per group).
        rho_start: proximal weight of the warm-start solve.
        fixmask: [r, q] bool fixed support, or None to select the support from ``|X + U|``.
        failures: Cholesky ``info`` tensors are appended here.
        products: the precision of the products.

    Returns:
        ``(Z, U, mask)``: the new sparse iterate, dual and support, [b, r, q] each.
    """
    design_op = products.split(design_t)
    gram = products.matmul(design_op, design_op.mT)
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt() + _EPS
    gram /= norms.unsqueeze(-1) * norms.unsqueeze(-2)
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    diagonal += diagonal.mean(-1, keepdim=True) * _REG
    scale = norms.unsqueeze(-1)
    rhs = products.matmul(design_op, target).div_(scale)
    inverse = products.split(_spd_inverse(gram, 1.0, failures))
    inverse_start = inverse if rho_start == 1.0 else _spd_inverse(gram, rho_start, failures)
    u = u * scale
    start = rhs if rho_start == 0 else rhs + rho_start * (z * scale - u)
    v = products.baddbmm(u, inverse_start, start)
    z, u, mask = _admm(v, inverse, rhs, _INNER_ITERS, fixmask, None if fixmask is not None else selection, products)
    return z / scale, u / scale, mask


def _factorize(
    target: torch.Tensor, plan: _Plan, iters: int, failures: list[torch.Tensor], products: Products
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 (``factorizef``): ``target ≈ S·R`` by alternating sparse least squares.

    Args:
        target: ``M`` [b, k, q], the input-norm-scaled weight in the plan's orientation.

    Returns:
        ``(S, R, mask_S, mask_R)``: S [b, k, k], R [b, k, q] and their bool supports.
    """
    batch, k, _ = target.shape
    square = torch.eye(k, dtype=target.dtype, device=target.device).expand(batch, k, k).contiguous()
    square_dual = torch.zeros_like(square)
    rect = target * topk_mask(target.abs().flatten(1), plan.rect.count // 2).view_as(target)
    rect_dual = torch.zeros_like(rect)
    target_op = products.split(target)
    for t in range(iters):
        rho_start = min(1.0, t / max(iters - 3, 1)) ** 3
        square_t, dual_t, mask_t = _sparse_ls(
            rect, target_op.mT, square.mT, square_dual.mT, plan.square, rho_start, plan.fixmask, failures, products
        )
        square, square_dual, mask_square = square_t.mT, dual_t.mT, mask_t.mT
        rect, rect_dual, mask_rect = _sparse_ls(
            square.mT, target_op, rect, rect_dual, plan.rect, rho_start, None, failures, products
        )
    return square, rect, mask_square, mask_rect


def refit_left(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    mask: torch.Tensor,
    iters: int,
    failures: list[torch.Tensor],
    products: Products = Products(),
) -> torch.Tensor:
    """Stage 2 (``finalize``): refit ``A`` on its support under ``tr((A·B − W)·H·(A·B − W)ᵀ)``; ADMM, ρ = 1.

    Args:
        weight: W [b, m, n]; hessian: H [n, n]; left: A [b, m, k]; right: B [b, k, n]; mask: A's support;
        products: the precision of the products (default fp32).

    Returns:
        The refitted A [b, m, k], zero outside ``mask``.
    """
    right_op = products.split(right)
    right_h = products.matmul(right_op, hessian)
    gram = products.matmul(right_h, right_op.mT)
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt() + _EPS
    gram = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    scale = norms.unsqueeze(-1)
    rhs = products.matmul(right_h, weight.mT) / scale
    inverse = products.split(_spd_inverse(gram, 1.0, failures))
    x = (left * norms.unsqueeze(-2)).mT
    z, _, _ = _admm(x, inverse, rhs, iters, mask.mT, None, products)
    return (z / scale).mT


def _refit_right(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    mask: torch.Tensor,
    iters: int,
) -> torch.Tensor:
    """The CNN notebooks' ``get_at``: refit ``B`` on its support under ``tr((A·B − W)·H·(A·B − W)ᵀ)``; ADMM, ρ = 1.

    In normalized coordinates ``X = diag(c)·B·diag(s)`` (``c`` the column norms of ``A``, ``s = sqrt(diag H)``),
    with ``G̃ = ÃᵀÃ`` (``Ã = A·diag(c)⁻¹``) and ``H̃ = diag(s)⁻¹·H·diag(s)⁻¹``, each least-squares step solves the
    Sylvester equation ``G̃·X·H̃ + X = R + Z − U`` (``R = diag(c)⁻¹·Aᵀ·W·H·diag(s)⁻¹``) as
    ``X = Q·[(Qᵀ·F·P) ⊘ (e·dᵀ + 1)]·Pᵀ`` from ``G̃ = Q·diag(e)·Qᵀ`` and ``H̃ = P·diag(d)·Pᵀ`` (``torch.linalg.eigh``).

    Args:
        weight: W [b, m, n]; hessian: H [n, n] (dead inputs already removed); left: A [b, m, k];
        right: B [b, k, n]; mask: B's support [b, k, n]; iters: ADMM steps.

    Returns:
        The refitted B [b, k, n], zero outside ``mask``.
    """
    s = hessian.diagonal().sqrt() + _EPS
    h_eigval, h_eigvec = torch.linalg.eigh(hessian / (s.unsqueeze(-1) * s.unsqueeze(-2)))
    gram = left.mT @ left
    c = gram.diagonal(dim1=-2, dim2=-1).sqrt() + _EPS
    g_eigval, g_eigvec = torch.linalg.eigh(gram / (c.unsqueeze(-1) * c.unsqueeze(-2)))
    denominator = g_eigval.unsqueeze(-1) * h_eigval + 1
    rhs = (left.mT @ weight @ hessian) / (c.unsqueeze(-1) * s)
    keep, drop, sign = _mask_weights(mask, weight.dtype)
    v = right * c.unsqueeze(-1) * s  # X + U with U = 0
    for step in range(iters):
        u = v * drop
        if step < iters - 1:  # Z − U = (2·mask − 1)·V; X = solve(R + Z − U); V = X + U
            spectral = (g_eigvec.mT @ torch.addcmul(rhs, v, sign) @ h_eigvec) / denominator
            v = u + g_eigvec @ spectral @ h_eigvec.mT
    return v * keep / (c.unsqueeze(-1) * s)


@contextmanager
def _prefer_cusolver(device: torch.device) -> Iterator[None]:
    """On CUDA, route batched Cholesky/inverse to cuSOLVER (MAGMA's batched inverse loops with host syncs)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(saved)


def _solve_stack(
    weights: torch.Tensor, hessian: torch.Tensor, config: DSFConfig, plan: _Plan, failures: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DSF of a stack of same-shape weights sharing H.

    Args:
        weights: W [b, m, n] in the compute dtype; hessian: H [n, n].
        failures: Cholesky ``info`` tensors are appended here (checked by the caller).

    Returns:
        ``(A, B, mask_A, mask_B)``: A [b, m, k], B [b, k, n] and their bool supports.
    """
    weights, hessian = remove_dead_inputs(weights, hessian)
    norms = hessian.diagonal().sqrt() + _EPS if config.input_scaling else torch.ones_like(hessian.diagonal())
    scaled = weights * norms
    target = scaled.mT.contiguous() if plan.transposed else scaled
    products = Products(config.matmul)
    square, rect, mask_square, mask_rect = _factorize(target, plan, config.iters, failures, products)
    if plan.transposed:  # W ≈ Rᵀ·(Sᵀ·diag(s)⁻¹)
        left, mask_left, right, mask_right = rect.mT, mask_rect.mT, square.mT / norms, mask_square.mT
    else:  # W ≈ S·(R·diag(s)⁻¹)
        left, mask_left, right, mask_right = square, mask_square, rect / norms, mask_rect
    if config.finalize:
        left = refit_left(weights, hessian, left, right, mask_left, config.finalize_iters, failures, products)
    if config.refit_right:
        right = _refit_right(weights, hessian, left, right, mask_right, config.refit_right_iters)
    return left.contiguous(), right.contiguous(), mask_left.contiguous(), mask_right.contiguous()


def _check_cholesky(failures: list[torch.Tensor], layer_names: list[str | None]) -> None:
    """Raise if any Cholesky factorization of a solve failed (one host synchronization, after all loops).

    Raises:
        RuntimeError: naming the layers and the likely causes.
    """
    if failures and bool(torch.stack([info.amax() for info in failures]).amax() > 0):
        raise _cholesky_error(layer_names)


def _cholesky_error(layer_names: list[str | None]) -> RuntimeError:
    names = ", ".join(repr(name) for name in layer_names if name) or "this group"
    return RuntimeError(
        f"DSF failed on {names}: a Gram matrix was not positive definite (an all-zero weight, all inputs dead, "
        "or a non-PSD H); check the weight and the calibration Hessian"
    )


def solve_batches(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Which layers of a group DSF solves together: the indices of each same-shape set (in order of first
    appearance), except that a shape with more than ``BATCH_MAX_ELEMENTS`` weights is solved one layer at a time.

    ``compress.distributed`` makes its solve units with this too, so any number of ranks solves the same batches.

    Args:
        shapes: ``(out, in)`` of each layer of the group, in order.

    Returns:
        Lists of indices into ``shapes``; together they cover every index once.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(index)
    batches = []
    for shape, indices in by_shape.items():
        if shape[0] * shape[1] > BATCH_MAX_ELEMENTS:
            batches.extend([index] for index in indices)
        else:
            batches.append(indices)
    return batches


@torch.no_grad()
def solve_dsf_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    config: DSFConfig,
    *,
    layer_names: list[str | None] | None = None,
) -> list[SolveResult]:
    """DSF of several layers that share one Hessian (q/k/v; gate/up); same-shape layers are solved as one batch
    (``solve_batches``: up to ``BATCH_MAX_ELEMENTS`` weights per layer).

    Batching changes only the floating-point summation order, not the algorithm. Each member's ``seconds`` is
    its batch's wall time divided by the batch size.

    Args:
        weights: W_i [out_i, in], any float dtype (float64 computes in float64, otherwise fp32).
        hessian: the shared H [in, in].
        config: DSF options.
        layer_names: one per weight, for error messages.

    Returns:
        One ``SolveResult`` (kind ``"dsf"``, factors ``A`` [out, k], ``B`` [k, in]) per weight, in order.

    Raises:
        ValueError: for invalid inputs or a density below DSF's minimum for a shape.
        RuntimeError: if a Cholesky factorization failed.
    """
    names = layer_names if layer_names is not None else [None] * len(weights)
    if len(names) != len(weights):
        raise ValueError(f"got {len(names)} layer names for {len(weights)} weights")
    checked = [validate_layer(w, hessian, name) for w, name in zip(weights, names)]
    if config.matmul == "3xtf32" and checked and checked[0][0].dtype != torch.float32:
        raise ValueError(f"{layer_prefix(names[0])}matmul='3xtf32' splits float32 products; got "
                         f"{checked[0][0].dtype} weights (use matmul='fp32')")
    batches = solve_batches([tuple(weight.shape) for weight, _ in checked])
    plans = {}
    for indices in batches:
        shape = tuple(checked[indices[0]][0].shape)
        if shape not in plans:
            plans[shape] = _plan(torch.Size(shape), config, checked[indices[0]][0].device, names[indices[0]])
    results: list[SolveResult | None] = [None] * len(weights)
    for indices in batches:
        hess = checked[indices[0]][1]
        stack = torch.stack([checked[i][0] for i in indices])
        shape = tuple(stack.shape[1:])
        start = time.perf_counter()
        failures: list[torch.Tensor] = []
        try:
            with exact_fp32(), _prefer_cusolver(stack.device):
                left, right, mask_left, mask_right = _solve_stack(stack, hess, config, plans[shape], failures)
        except torch.linalg.LinAlgError as error:  # CPU checks the inverse of a failed factor eagerly
            raise _cholesky_error([names[i] for i in indices]) from error
        _check_cholesky(failures, [names[i] for i in indices])
        seconds = elapsed(start, stack.device) / len(indices)
        for j, i in enumerate(indices):
            results[i] = make_result(
                "dsf",
                {"A": left[j], "B": right[j]},
                {"A": mask_left[j], "B": mask_right[j]},
                checked[i][0],
                hess,
                seconds,
            )
    return results  # type: ignore[return-value]


@torch.no_grad()
def solve_dsf(
    weight: torch.Tensor, hessian: torch.Tensor, config: DSFConfig, *, layer_name: str | None = None
) -> SolveResult:
    """DSF of one layer: ``W ≈ A·B`` with ``nnz(A) + nnz(B) = int(out·in·density)``.

    Args:
        weight: W [out, in], any float dtype (float64 computes in float64, otherwise fp32).
        hessian: H [in, in] = (2/N)·Σ xxᵀ of the layer input.
        config: DSF options.
        layer_name: put into error messages.

    Returns:
        ``SolveResult`` of kind ``"dsf"`` with factors ``A`` [out, k], ``B`` [k, in], ``k = min(out, in)``,
        their masks, and the error ``tr(ΔW·H·ΔWᵀ)`` of ``A·B``.

    Raises:
        ValueError: for invalid inputs or a density below DSF's minimum for this shape.
        RuntimeError: if a Cholesky factorization failed.
    """
    return solve_dsf_group([weight], hessian, config, layer_names=[layer_name])[0]
