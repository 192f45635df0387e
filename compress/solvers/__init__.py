"""Layer solvers: one interface for DSF, SparseGPT, Wanda, magnitude pruning and layer-wise I-OBS.

A solver compresses one weight matrix ``W`` [out, in] given the Hessian ``H`` [in, in] of its input and a
method config, and returns a ``SolveResult``. Build configs with ``make_config`` (from a method name, e.g. CLI
flags) or the config classes directly.

Example:
    >>> import torch
    >>> config = make_config("magnitude", 0.5)
    >>> result = solve(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), torch.eye(2), config)
    >>> result.nnz, result.factors["W"].tolist()
    (2, [[0.0, -3.0], [0.0, 2.0]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from compress.solvers.base import SolveResult, SolverConfig
from compress.solvers.dsf import DSFConfig, solve_dsf, solve_dsf_group
from compress.solvers.iobs import IOBSConfig, solve_iobs
from compress.solvers.magnitude import MagnitudeConfig, solve_magnitude
from compress.solvers.sparsegpt import SparseGPTConfig, solve_sparsegpt
from compress.solvers.wanda import WandaConfig, solve_wanda

__all__ = [
    "METHODS",
    "DSFConfig",
    "IOBSConfig",
    "MagnitudeConfig",
    "SolveResult",
    "SolverConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "make_config",
    "solve",
    "solve_group",
]

METHODS: dict[str, type[SolverConfig]] = {
    "dsf": DSFConfig,
    "sparsegpt": SparseGPTConfig,
    "wanda": WandaConfig,
    "magnitude": MagnitudeConfig,
    "iobs": IOBSConfig,
}

_SOLVERS: dict[type[SolverConfig], Callable[..., SolveResult]] = {
    DSFConfig: solve_dsf,
    SparseGPTConfig: solve_sparsegpt,
    WandaConfig: solve_wanda,
    MagnitudeConfig: solve_magnitude,
    IOBSConfig: solve_iobs,
}


def _options(config_class: type[SolverConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class) if f.init and f.name != "density"]


def make_config(method: str, density: float, **options: object) -> SolverConfig:
    """Build and validate the config of ``method``.

    Args:
        method: one of ``METHODS`` (``"dsf"``, ``"sparsegpt"``, ``"wanda"``, ``"magnitude"``, ``"iobs"``).
        density: kept fraction, in (0, 1].
        **options: method options (the config class's fields), e.g. ``iters=20`` for DSF.

    Returns:
        A frozen config instance.

    Raises:
        ValueError: for an unknown method or option (listing the valid ones) or an invalid value.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    config_class = METHODS[method]
    valid = _options(config_class)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return config_class(density=density, **options)


def _solver(config: SolverConfig) -> Callable[..., SolveResult]:
    solver = _SOLVERS.get(type(config))
    if solver is None:
        raise TypeError(
            f"config must be one of {', '.join(c.__name__ for c in _SOLVERS)}, got {type(config).__name__}; "
            "build it with make_config"
        )
    return solver


def solve(
    weight: torch.Tensor, hessian: torch.Tensor, config: SolverConfig, *, layer_name: str | None = None
) -> SolveResult:
    """Compress one layer.

    Args:
        weight: W [out, in], any float dtype (computed in fp32; float64 input computes in float64).
        hessian: H [in, in] = (2/N)·Σ xxᵀ of the layer input.
        config: a method config (``make_config``).
        layer_name: put into error messages.

    Returns:
        ``SolveResult``: factors ``A`` [out, k], ``B`` [k, in] for DSF, ``W`` [out, in] otherwise; masks;
        ``nnz``; error ``tr(ΔW·H·ΔWᵀ)``; seconds.

    Raises:
        ValueError: for invalid inputs or options.
        TypeError: for an object that is not a solver config.
    """
    return _solver(config)(weight, hessian, config, layer_name=layer_name)


def solve_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    config: SolverConfig,
    *,
    layer_names: list[str | None] | None = None,
) -> list[SolveResult]:
    """Compress layers that share one Hessian (q/k/v; gate/up), in order.

    DSF solves same-shape members as one batch (batched GEMMs and Cholesky); other methods loop.

    Args:
        weights: W_i [out_i, in].
        hessian: the shared H [in, in].
        config: a method config.
        layer_names: one per weight, for error messages.

    Returns:
        One ``SolveResult`` per weight.

    Raises:
        ValueError: for invalid inputs or options.
        TypeError: for an object that is not a solver config.
    """
    solver = _solver(config)
    names = layer_names if layer_names is not None else [None] * len(weights)
    if len(names) != len(weights):
        raise ValueError(f"got {len(names)} layer names for {len(weights)} weights")
    if isinstance(config, DSFConfig):
        return solve_dsf_group(weights, hessian, config, layer_names=names)
    return [solver(w, hessian, config, layer_name=name) for w, name in zip(weights, names)]
