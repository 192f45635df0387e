"""The solver interface: configs, validation, exact budgets, N:M, dead inputs and the method ordering."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from compress.solvers import (
    METHODS,
    DSFConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    make_config,
    solve,
    solve_group,
)
from compress.solvers.base import nnz_budget, topk_mask
from tests.compress.dsf_reference import synthetic_layer

SHAPES = [(64, 96), (96, 64), (48, 48)]
DENSITIES = [0.5, 0.4, 0.3, 0.37]
SINGLE = ["sparsegpt", "wanda", "magnitude", "iobs"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test matrices are tiny: one intra-op thread is faster and stable on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    weight, hessian = synthetic_layer(*shape, seed=seed)
    return weight.float(), hessian.float()


def _fast(method: str, density: float, **options: object):
    """Configs for tests where the DSF trajectory does not matter (budgets, shapes): few iterations."""
    if method == "dsf":
        options.setdefault("iters", 4)
    return make_config(method, density, **options)


def _check_support(result, budget: int) -> None:
    assert result.nnz == budget
    assert sum(int(mask.sum()) for mask in result.masks.values()) == budget
    for name, factor in result.factors.items():
        mask = result.masks[name]
        assert mask.dtype == torch.bool and mask.shape == factor.shape
        assert not factor[~mask].any(), f"{name} has values outside its mask"
        assert bool((factor[mask] != 0).all()), f"{name} has exact zeros inside its mask"


# ---------------------------------------------------------------------------------------------- configs


def test_methods_and_names() -> None:
    assert list(METHODS) == ["dsf", "sparsegpt", "wanda", "magnitude", "iobs"]
    for name, config_class in METHODS.items():
        config = config_class(density=0.5)
        assert config.method == name and config.density == 0.5


def test_make_config_options() -> None:
    config = make_config("sparsegpt", 0.5, prune_n=2, prune_m=4, blocksize=64)
    assert config == SparseGPTConfig(density=0.5, prune_n=2, prune_m=4, blocksize=64)
    assert make_config("dsf", 0.4, iters=10, finalize=False) == DSFConfig(density=0.4, iters=10, finalize=False)


def test_make_config_unknown_method() -> None:
    with pytest.raises(ValueError) as info:
        make_config("obc", 0.5)
    assert str(info.value) == "unknown method 'obc'; valid methods: dsf, sparsegpt, wanda, magnitude, iobs"


def test_make_config_unknown_option() -> None:
    with pytest.raises(ValueError) as info:
        make_config("dsf", 0.5, blocksize=128)
    assert str(info.value) == (
        "unknown option(s) 'blocksize' for method 'dsf'; "
        "valid options: iters, square_density, fixmask, fixmask_seed, finalize, finalize_iters, input_scaling, "
        "refit_right, refit_right_iters, group_size, matmul"
    )


@pytest.mark.parametrize("density", [0, 1.5, math.nan, -0.2])
@pytest.mark.parametrize("method", list(METHODS))
def test_bad_density(method: str, density: float) -> None:
    with pytest.raises(ValueError) as info:
        make_config(method, density)
    assert str(info.value) == (
        f"density must be in (0, 1], got {density!r}; pass the fraction of weights to keep (0.5 keeps half)"
    )


def test_nm_density_mismatch() -> None:
    with pytest.raises(ValueError) as info:
        WandaConfig(density=0.4, prune_n=2, prune_m=4)
    assert str(info.value) == "2:4 sparsity keeps a fraction 0.5 of the weights, but density=0.4; pass density=0.5"
    with pytest.raises(ValueError, match=r"N:M sparsity needs 0 < prune_n < prune_m, got prune_n=4, prune_m=2"):
        MagnitudeConfig(density=1.0, prune_n=4, prune_m=2)
    with pytest.raises(ValueError, match=r"blocksize=100 must be a multiple of prune_m=8"):
        SparseGPTConfig(density=0.5, prune_n=4, prune_m=8, blocksize=100)


def test_dsf_option_errors() -> None:
    with pytest.raises(ValueError, match=r"^iters must be >= 1, got 0"):
        DSFConfig(density=0.5, iters=0)
    with pytest.raises(ValueError, match=r"^square_density must be in \(0, 1\] or None"):
        DSFConfig(density=0.5, square_density=0.0)
    with pytest.raises(ValueError, match=r"^finalize_iters must be >= 1, got 0"):
        DSFConfig(density=0.5, finalize_iters=0)
    with pytest.raises(ValueError, match=r"^square_density has no effect with fixmask=True"):
        DSFConfig(density=0.5, fixmask=True, square_density=0.2)


def test_not_a_config() -> None:
    with pytest.raises(TypeError, match=r"config must be one of DSFConfig, SparseGPTConfig, WandaConfig"):
        solve(torch.eye(4), torch.eye(4), {"method": "dsf"})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_inputs(method: str) -> None:
    config = _fast(method, 0.5)
    with pytest.raises(ValueError) as info:
        solve(torch.ones(2, 3, 4), torch.eye(4), config, layer_name="blk.0.q")
    assert str(info.value) == (
        "layer 'blk.0.q': weight must be a non-empty 2-D [out, in] matrix, got shape (2, 3, 4); "
        "flatten convolution kernels to [out, in·kh·kw] first"
    )
    with pytest.raises(ValueError) as info:
        solve(torch.ones(8, 4), torch.eye(5), config)
    assert str(info.value) == (
        "hessian has shape (5, 5), expected (4, 4) for a weight of shape (8, 4); pass the H of this layer's input"
    )
    weight = torch.ones(8, 4)
    weight[1, 2] = math.nan
    with pytest.raises(ValueError) as info:
        solve(weight, torch.eye(4), config, layer_name="x")
    assert str(info.value) == "layer 'x': weight contains NaN or Inf"
    with pytest.raises(ValueError) as info:
        solve(torch.ones(8, 4), torch.full((4, 4), math.inf), config)
    assert str(info.value) == "hessian contains NaN or Inf; check the calibration inputs"
    with pytest.raises(ValueError, match=r"^weight must be floating point, got torch.int64"):
        solve(torch.ones(8, 4, dtype=torch.long), torch.eye(4), config)


def test_nm_needs_divisible_inputs() -> None:
    with pytest.raises(ValueError) as info:
        solve(torch.ones(4, 6), torch.eye(6), WandaConfig(density=0.5, prune_n=2, prune_m=4), layer_name="fc")
    assert str(info.value) == "layer 'fc': in_features=6 is not a multiple of prune_m=4; N:M groups must tile each row"


# ---------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", list(METHODS))
def test_exact_nnz(method: str, shape: tuple[int, int], density: float) -> None:
    weight, hessian = _layer(shape)
    result = solve(weight, hessian, _fast(method, density))
    _check_support(result, nnz_budget(shape, density))
    assert result.weight().shape == shape
    assert result.seconds > 0
    assert math.isfinite(result.error) and result.relative_error > 0


def test_dsf_factor_shapes_and_split() -> None:
    """m < n: square factor on the output side; m >= n: on the input side; budget split int(k²·asp) / rest."""
    for (m, n), square, square_key in [((64, 96), (64, 64), "A"), ((96, 64), (64, 64), "B"), ((48, 48), (48, 48), "B")]:
        weight, hessian = _layer((m, n))
        result = solve(weight, hessian, _fast("dsf", 0.5))
        k = min(m, n)
        assert result.factors["A"].shape == (m, k) and result.factors["B"].shape == (k, n)
        assert result.factors[square_key].shape == square
        asp = 0.16 if m == n else 0.25
        assert int(result.masks[square_key].sum()) == int(k * k * asp)


@pytest.mark.parametrize("method", list(METHODS))
def test_density_one(method: str) -> None:
    weight, hessian = _layer((48, 64))
    result = solve(weight, hessian, make_config(method, 1.0))
    assert result.nnz == weight.numel()
    if method == "dsf":
        assert result.relative_error < 1e-3
    else:
        assert torch.equal(result.factors["W"], weight)
        assert result.error == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_dead_inputs(method: str) -> None:
    weight, hessian = _layer((40, 32))
    dead = torch.tensor([0, 5, 17])
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    result = solve(weight, hessian, _fast(method, 0.5))
    _check_support(result, nnz_budget(weight.shape, 0.5))
    for factor in result.factors.values():
        assert bool(torch.isfinite(factor).all())
    if method != "magnitude":  # magnitude ignores H
        assert not result.weight()[:, dead].any(), "dead input columns must be zero"
    assert math.isfinite(result.error)


@pytest.mark.parametrize("method", SINGLE)
def test_nm_pattern(method: str) -> None:
    weight, hessian = _layer((32, 64))
    result = solve(weight, hessian, make_config(method, 0.5, prune_n=2, prune_m=4))
    kept = result.masks["W"].reshape(32, 16, 4).sum(-1)
    assert bool((kept == 2).all())
    _check_support(result, 32 * 64 // 2)


# ---------------------------------------------------------------------------------------------- objectives


def test_reported_error_is_float64_recomputation() -> None:
    weight, hessian = _layer((64, 96))
    for method in METHODS:
        result = solve(weight, hessian, _fast(method, 0.4))
        delta = result.weight().double() - weight.double()
        expected = torch.trace(delta @ hessian.double() @ delta.T).item()
        reference = torch.trace(weight.double() @ hessian.double() @ weight.double().T).item()
        assert result.error == pytest.approx(expected, rel=1e-9)
        assert result.relative_error == pytest.approx(expected / reference, rel=1e-9)


def _sparsegpt_port(weight: torch.Tensor, hessian: torch.Tensor, density: float, blocksize: int) -> torch.Tensor:
    """``IST-DASLab/sparsegpt`` ``fasterprune`` (unstructured), float64, with the exact per-block budget."""
    W, H = weight.clone(), hessian.clone()
    rows, columns = W.shape
    budget = int(rows * columns * density)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(columns), range(columns)] += 0.01 * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        keep = budget * i2 // columns - budget * i1 // columns
        thresh = torch.sort(tmp.flatten(), descending=True)[0][keep - 1]
        mask1 = tmp < thresh  # pruned
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_matches_reference_port() -> None:
    weight, hessian = synthetic_layer(48, 80, seed=3)
    result = solve(weight, hessian, SparseGPTConfig(density=0.45, blocksize=32))
    expected = _sparsegpt_port(weight, hessian, 0.45, 32)
    assert torch.equal(result.masks["W"], expected != 0)
    torch.testing.assert_close(result.factors["W"], expected, rtol=1e-10, atol=1e-12)


def test_sparsegpt_float32_close_to_float64() -> None:
    weight, hessian = synthetic_layer(64, 96, seed=2)
    exact = solve(weight, hessian, SparseGPTConfig(density=0.5))
    single = solve(weight.float(), hessian.float(), SparseGPTConfig(density=0.5))
    assert single.relative_error == pytest.approx(exact.relative_error, rel=1e-3)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_selection_is_optimal_for_its_metric(method: str) -> None:
    weight, hessian = _layer((40, 56))
    result = solve(weight, hessian, make_config(method, 0.37))
    mask = result.masks["W"]
    if method == "wanda":
        metric = weight.abs() * hessian.diagonal().sqrt()
        per_row = mask.sum(1)
        budget = nnz_budget(weight.shape, 0.37)
        assert per_row.tolist() == [budget // 40 + (i < budget % 40) for i in range(40)]
        worst_kept = metric.masked_fill(~mask, math.inf).amin(1)
        best_pruned = metric.masked_fill(mask, -math.inf).amax(1)
    else:
        metric = weight.abs()
        worst_kept = metric[mask].amin()
        best_pruned = metric[~mask].amax()
    assert bool((worst_kept >= best_pruned).all())
    assert torch.equal(result.factors["W"], weight * mask)


@pytest.mark.parametrize("method", SINGLE)
def test_group_loops_single_methods(method: str) -> None:
    weight_a, hessian = _layer((32, 48), seed=4)
    weight_b, _ = _layer((16, 48), seed=5)
    grouped = solve_group([weight_a, weight_b], hessian, make_config(method, 0.5))
    for weight, result in zip([weight_a, weight_b], grouped):
        alone = solve(weight, hessian, make_config(method, 0.5))
        assert torch.equal(result.factors["W"], alone.factors["W"])


@pytest.mark.parametrize(
    "shape,density", [((64, 64), 0.5), ((64, 160), 0.4), ((160, 64), 0.3)], ids=["square", "wide", "tall"]
)
def test_method_ordering(shape: tuple[int, int], density: float) -> None:
    """The doc's synthetic check (§1.9): DSF < SparseGPT < Wanda < magnitude, and finalize helps."""
    weight, hessian = synthetic_layer(*shape, seed=1)
    weight, hessian = weight.float(), hessian.float()
    errors = {method: solve(weight, hessian, make_config(method, density)).error for method in METHODS}
    assert errors["dsf"] < errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---------------------------------------------------------------------------------------------- selection


def _sorted_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = scores.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


@pytest.mark.parametrize("size", [1000, 100_000], ids=["topk-path", "cpu-bracket-path"])
@pytest.mark.parametrize("fraction", [0.00002, 0.01, 0.16, 0.41, 0.5, 0.9, 0.99999])
def test_topk_mask_exact(size: int, fraction: float) -> None:
    generator = torch.Generator().manual_seed(size)
    scores = torch.randn(3, size, generator=generator).abs()
    scores[1, :50] *= 1000  # outliers
    k = max(1, int(size * fraction))
    mask = topk_mask(scores, k)
    assert torch.equal(mask, _sorted_top_k(scores, k))


@pytest.mark.parametrize("size", [1000, 100_000], ids=["topk-path", "cpu-bracket-path"])
def test_topk_mask_ties_and_edges(size: int) -> None:
    scores = torch.zeros(2, size)
    scores[:, :10] = torch.arange(1.0, 11.0)
    for k in (5, 10, 11, 300, size - 1):
        mask = topk_mask(scores, k)
        assert mask.sum(-1).tolist() == [k, k]
        assert bool(mask[:, 10 - min(k, 10) : 10].all())
    assert topk_mask(scores, 0).sum() == 0 and bool(topk_mask(scores, size).all())
    assert topk_mask(torch.ones(size), 777).sum() == 777


@pytest.mark.parametrize("module", ["compress.solvers", "compress.hessian"])
def test_docstring_examples(module: str) -> None:
    assert doctest.testmod(importlib.import_module(module)).failed == 0


@pytest.mark.parametrize("method", ["sparsegpt", "iobs"])
def test_indefinite_hessian_error_names_the_layer(method: str) -> None:
    weight, hessian = torch.randn(4, 8), -torch.eye(8)
    with pytest.raises(RuntimeError) as info:
        solve(weight, hessian, make_config(method, 0.5), layer_name="model.layers.0.q_proj")
    assert str(info.value).startswith("layer 'model.layers.0.q_proj': ")
    assert "the damped Hessian is not positive definite (percdamp=0.01); raise percdamp" in str(info.value)
