"""The one interface every layer solver implements.

A solver takes a layer's weight ``W`` (out × in) and the calibration Hessian ``H = (2/N)·Σ xxᵀ`` (in × in) and
returns the compressed weight as factors: ``{"A": [out, k], "B": [k, in]}`` for DSF (``W ≈ A·B``) or
``{"W": [out, in]}`` for single-sparse methods, together with their non-zero count and the layer error
``tr(ΔW·H·ΔWᵀ)``. Solvers never print, never touch a model, and compute in fp32 on the device of ``W``.

Besides the result type this module holds what every solver shares: the config base class with density
validation, input validation, the SparseGPT dead-input rule, exact top-k / N:M mask selection, TF32 control and
result assembly (error and device-synchronized timing).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "NMConfig",
    "SolveResult",
    "SolverConfig",
    "check_density",
    "damp",
    "check_nm",
    "check_nm_shape",
    "elapsed",
    "exact_fp32",
    "layer_error",
    "layer_prefix",
    "make_result",
    "nm_mask",
    "nnz_budget",
    "remove_dead_inputs",
    "topk_mask",
    "validate_layer",
]

FactorKind = Literal["dsf", "single"]


@dataclass(frozen=True)
class SolveResult:
    """Result of compressing one layer.

    Attributes:
        kind: ``"dsf"`` (factors ``A`` [out, k] and ``B`` [k, in]) or ``"single"`` (factor ``W`` [out, in]).
        factors: the factor matrices, fp32, zeros where pruned.
        nnz: total non-zeros over all factors: the number of kept positions, i.e. the sum of the ``masks``
            counts when masks are given.
        error: ``tr(ΔW·H·ΔWᵀ)`` of the product against the original weight.
        relative_error: ``error / tr(W·H·Wᵀ)``.
        seconds: wall time of the solve (device-synchronized).
        masks: optional exact support of each factor (bool, same keys and shapes as ``factors``). Values are zero
            outside the mask; inside it they are non-zero except in degenerate cases (e.g. a budget larger than
            the number of live weights when inputs are dead), so ``nnz`` is counted from the masks.
        values: each factor's value format (``{"A": "int8", "B": "int4"}``; ``"int8"``, ``"fp8"``, ``"int4"``) when
            the factor values are quantized (``compress.quantize.quantize_result``), else None.
        scales: with ``values``, each factor's fp16 scales: ``[rows]``, or int4's ``[rows, ceil(cols/group_size)]``;
            its ``factors`` entry then holds exactly ``code · scale`` in fp32, so the codes are ``factor / scale``
            (``compress.quantize.codes_of``).
        group_size: the columns per scale of the int4 factors (None when no factor is int4).
    """

    kind: FactorKind
    factors: dict[str, torch.Tensor]
    nnz: int
    error: float
    relative_error: float
    seconds: float
    masks: dict[str, torch.Tensor] | None = None
    values: dict[str, str] | None = None
    scales: dict[str, torch.Tensor] | None = None
    group_size: int | None = None

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
    err = torch.sum((delta @ h) * delta).item()
    ref = torch.sum((w @ h) * w).item()
    return err, err / ref if ref > 0 else float("inf")


def nnz_budget(shape: tuple[int, int] | torch.Size, density: float) -> int:
    """Total non-zeros allowed for a layer of ``shape`` at ``density``: ``int(out·in·density)``,
    the single-matrix budget that DSF's two factors share."""
    return int(shape[0] * shape[1] * density)


def layer_prefix(layer_name: str | None) -> str:
    """``"layer 'NAME': "`` for error messages, or ``""`` when the caller gave no name."""
    return f"layer {layer_name!r}: " if layer_name else ""


def damp(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``H + percdamp·mean(diag H)·I`` [n, n], a new tensor (SparseGPT's damping)."""
    damped = hessian.clone()
    damped.diagonal().add_(percdamp * hessian.diagonal().mean())
    return damped


def check_density(density: float) -> None:
    """Raise ``ValueError`` unless ``density`` is a real number in (0, 1] (NaN is rejected)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(
            f"density must be in (0, 1], got {density!r}; pass the fraction of weights to keep (0.5 keeps half)"
        )


def check_nm(density: float, prune_n: int, prune_m: int) -> None:
    """Validate N:M options: both 0 (unstructured) or ``0 < prune_n < prune_m`` with ``density == prune_n/prune_m``.

    Raises:
        ValueError: naming the inconsistent option and the value to pass instead.
    """
    if prune_n == 0 and prune_m == 0:
        return
    if not 0 < prune_n < prune_m:
        raise ValueError(
            f"N:M sparsity needs 0 < prune_n < prune_m, got prune_n={prune_n}, prune_m={prune_m}; "
            "e.g. prune_n=2, prune_m=4 keeps 2 of every 4 weights (set both to 0 for unstructured)"
        )
    if not math.isclose(density, prune_n / prune_m, rel_tol=0, abs_tol=1e-12):
        raise ValueError(
            f"{prune_n}:{prune_m} sparsity keeps a fraction {prune_n / prune_m:g} of the weights, "
            f"but density={density!r}; pass density={prune_n / prune_m!r}"
        )


@dataclass(frozen=True)
class SolverConfig:
    """Options shared by every solver; each method subclasses it with a fixed ``method`` name and its options.

    Attributes:
        density: fraction of the layer's weights kept, in (0, 1]; the non-zero budget is ``int(out·in·density)``.
    """

    density: float

    def __post_init__(self) -> None:
        check_density(self.density)


@dataclass(frozen=True)
class NMConfig(SolverConfig):
    """Options of a single-matrix solver that also prunes N:M (magnitude, Wanda, SparseGPT, I-OBS).

    Attributes:
        density: kept fraction, in (0, 1]; must equal ``prune_n/prune_m`` for N:M.
        prune_n: for N:M sparsity, weights kept in every group of ``prune_m`` (0 = unstructured).
        prune_m: N:M group size (0 = unstructured); must divide the layer's in_features.
    """

    prune_n: int = 0
    prune_m: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nm(self.density, self.prune_n, self.prune_m)


def validate_layer(
    weight: torch.Tensor, hessian: torch.Tensor, layer_name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a layer's inputs and return them in the compute dtype on the weight's device.

    Args:
        weight: W [out, in], any float dtype.
        hessian: H [in, in], symmetric positive semi-definite, any float dtype and device.
        layer_name: put into error messages.

    Returns:
        ``(W, H)``: float64 when ``weight`` is float64 (used by tests), otherwise fp32; may alias the inputs.

    Raises:
        ValueError: for a non-2-D or non-float weight, a Hessian of the wrong shape, or non-finite values.
    """
    where = layer_prefix(layer_name)
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(
            f"{where}weight must be a non-empty 2-D [out, in] matrix, got shape {tuple(weight.shape)}; "
            "flatten convolution kernels to [out, in·kh·kw] first"
        )
    if not weight.is_floating_point():
        raise ValueError(f"{where}weight must be floating point, got {weight.dtype}")
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise ValueError(
            f"{where}hessian has shape {tuple(hessian.shape)}, expected ({n}, {n}) for a weight of shape "
            f"{tuple(weight.shape)}; pass the H of this layer's input"
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.to(dtype)
    hessian = hessian.to(weight.device, dtype)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}weight contains NaN or Inf")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{where}hessian contains NaN or Inf; check the calibration inputs")
    return weight, hessian


def remove_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's dead-input rule: where ``H_jj == 0`` set ``H_jj = 1`` and zero column j of W.

    A dead input never reaches the layer output, so this changes no layer error, and it keeps the
    ``1/sqrt(H_jj)`` and ``H⁻¹`` computations finite.

    Args:
        weight: W [..., out, in] (a batch of weights sharing H is allowed).
        hessian: H [in, in].

    Returns:
        New tensors ``(W, H)``; the inputs are not modified.
    """
    dead = torch.diagonal(hessian) == 0
    hessian = hessian.clone()
    hessian.diagonal().masked_fill_(dead, 1)
    weight = weight.masked_fill(dead, 0)
    return weight, hessian


_SAMPLE = 8192  # sample size of the CPU selection's threshold bracket


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the ``k`` largest entries of each row of ``scores``.

    Ties at the threshold are broken arbitrarily, so the count is exact. On CUDA this is ``torch.topk`` (no host
    synchronization). On CPU, rows of at least ``4·_SAMPLE`` entries use ``_cpu_top_k`` (same mask, about 2-3×
    faster than ``topk``); CPU execution is synchronous anyway, so that path may branch on values.

    Args:
        scores: [..., N] float, no NaN.
        k: entries kept per row, 0 <= k <= N.

    Returns:
        bool [..., N] with exactly ``k`` True per row.
    """
    size = scores.shape[-1]
    if k <= 0 or k >= size:
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    if scores.device.type == "cpu" and size >= 4 * _SAMPLE:
        rows = scores.reshape(-1, size)
        return torch.stack([_cpu_top_k(row, k) for row in rows]).view(scores.shape)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)


def _cpu_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-``k`` mask of a 1-D CPU tensor by a sampled threshold bracket.

    A fixed pseudo-random sample of ``_SAMPLE`` entries brackets the k-th largest value with a ±4σ margin; the
    entries inside the bracket (a few percent) are searched with ``kthvalue``. If the bracket misses, falls back to
    ``topk``. The result never depends on the sample, only the speed does.
    """
    size = values.numel()
    generator = torch.Generator().manual_seed(size)
    sample = values[torch.randint(size, (_SAMPLE,), generator=generator)].sort().values
    fraction = k / size
    center = (1 - fraction) * _SAMPLE
    margin = 4 * math.sqrt(_SAMPLE * fraction * (1 - fraction)) + 16
    low, high = math.floor(center - margin), math.ceil(center + margin)
    above = values > sample[high] if high < _SAMPLE else torch.zeros_like(values, dtype=torch.bool)
    window = ~above if low < 0 else (values > sample[low]) & ~above
    candidates = values[window]
    need = k - int(torch.count_nonzero(above))
    if not 1 <= need <= candidates.numel():
        mask = torch.zeros_like(values, dtype=torch.bool)
        return mask.scatter_(0, values.topk(k, sorted=False).indices, True)
    threshold = candidates.kthvalue(candidates.numel() - need + 1).values
    mask = values >= threshold
    excess = int(torch.count_nonzero(mask)) - k
    if excess:  # ties at the threshold: drop the last ones
        ties = (values == threshold).nonzero().flatten()
        mask[ties[ties.numel() - excess :]] = False
    return mask


def nm_mask(scores: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """N:M mask: in every group of ``prune_m`` consecutive entries of a row keep the ``prune_n`` largest.

    Args:
        scores: [rows, cols] float with ``cols % prune_m == 0``.

    Returns:
        bool [rows, cols] with exactly ``prune_n`` True per group.
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // prune_m, prune_m)
    return topk_mask(groups, prune_n).reshape(rows, cols)


def check_nm_shape(weight: torch.Tensor, prune_m: int, layer_name: str | None) -> None:
    """Raise ``ValueError`` when N:M groups of ``prune_m`` do not tile the input dimension of ``weight``."""
    if prune_m and weight.shape[1] % prune_m:
        raise ValueError(
            f"{layer_prefix(layer_name)}in_features={weight.shape[1]} is not a multiple of prune_m={prune_m}; "
            "N:M groups must tile each row"
        )


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Disable TF32 for CUDA matmuls and cuDNN inside the block (the reference solvers run in full fp32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start`` (a ``time.perf_counter()`` value), after waiting for ``device`` to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def make_result(
    kind: FactorKind,
    factors: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    weight: torch.Tensor,
    hessian: torch.Tensor,
    seconds: float,
) -> SolveResult:
    """Assemble a ``SolveResult``: ``nnz`` from the masks, error from ``layer_error`` against the original W and H.

    Args:
        kind: ``"dsf"`` or ``"single"``.
        factors: factor matrices (zero outside their masks).
        masks: bool support of each factor.
        weight: the original W [out, in] (before dead-input handling).
        hessian: the original H [in, in].
        seconds: solve wall time.
    """
    nnz = sum(int(torch.count_nonzero(mask)) for mask in masks.values())
    approx = factors["A"] @ factors["B"] if kind == "dsf" else factors["W"]
    error, relative = layer_error(weight, approx, hessian)
    return SolveResult(kind, factors, nnz, error, relative, seconds, masks)
