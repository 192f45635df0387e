"""DSF against the float64 port of the reference code, and the properties the algorithm must keep."""

from __future__ import annotations

import pytest
import torch

from compress.solvers import DSFConfig, make_config, solve, solve_group
from compress.solvers.base import layer_error, nnz_budget
from compress.solvers import dsf
from compress.solvers.dsf import BATCH_MAX_ELEMENTS, _fixed_mask, solve_batches
from tests.compress import dsf_reference as reference
from tests.compress.dsf_reference import synthetic_layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test matrices are tiny: one intra-op thread is faster and stable on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "shape,density,options",
    [
        ((64, 96), 0.5, {}),
        ((96, 64), 0.37, {}),
        ((48, 48), 0.4, {}),
        ((40, 72), 0.45, {"iters": 12, "finalize": False}),
    ],
    ids=["wide", "tall", "square", "no-finalize"],
)
def test_matches_reference_port_float64(shape: tuple[int, int], density: float, options: dict) -> None:
    """Same masks and factors as ``doublesparse.py`` (inverse, full sorts) when both run in float64."""
    weight, hessian = synthetic_layer(*shape)
    result = solve(weight, hessian, DSFConfig(density=density, **options))
    iters = options.get("iters", 40)
    expected, a_ref, b_ref = reference.factorize(
        weight, hessian, density, nofinal=not options.get("finalize", True), iters=iters
    )
    assert torch.equal(result.masks["A"], a_ref != 0)
    assert torch.equal(result.masks["B"], b_ref != 0)
    torch.testing.assert_close(result.factors["A"], a_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(result.factors["B"], b_ref, rtol=1e-9, atol=1e-11)
    assert result.error == pytest.approx(layer_error(weight, expected, hessian)[0], rel=1e-9)


def test_fixmask_matches_reference_port_float64() -> None:
    weight, hessian = synthetic_layer(48, 48, seed=6)
    config = DSFConfig(density=0.4, iters=10, fixmask=True, fixmask_seed=3)
    result = solve(weight, hessian, config)
    fixmask = _fixed_mask(48, 0.1, 3, torch.device("cpu"))
    _, a_ref, b_ref = reference.factorize(weight, hessian, 0.4, iters=10, fixmask=fixmask)
    assert torch.equal(result.masks["B"], fixmask)  # square W: the square factor is B (input side)
    assert bool(fixmask.diagonal().all()) and int(fixmask.sum()) == int(48 * 48 * 0.1)
    torch.testing.assert_close(result.factors["A"], a_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(result.factors["B"], b_ref, rtol=1e-9, atol=1e-11)
    assert result.nnz == nnz_budget((48, 48), 0.4)


def test_reference_selection_rule_differs_by_a_few_entries() -> None:
    """The documented deviation: the original strict ``>`` keeps one entry less per selection; error barely moves."""
    weight, hessian = synthetic_layer(64, 96)
    exact, a_ex, b_ex = reference.factorize(weight, hessian, 0.5, selection="exact")
    original, a_or, b_or = reference.factorize(weight, hessian, 0.5, selection="reference")
    budget = nnz_budget((64, 96), 0.5)
    assert int((a_ex != 0).sum() + (b_ex != 0).sum()) == budget
    assert budget - 3 <= int((a_or != 0).sum() + (b_or != 0).sum()) < budget
    error_exact = layer_error(weight, exact, hessian)[0]
    assert layer_error(weight, original, hessian)[0] == pytest.approx(error_exact, rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_close_to_float64(seed: int) -> None:
    """fp32 (TF32 off) against float64 on the same input: error within 10%.

    Mask selection is discontinuous: a near-tie decided differently in fp32 changes the trajectory, after which
    the two runs find different (equally good) local solutions; without such a flip they agree to ~1e-6.
    The exact comparison is ``test_matches_reference_port_float64``.
    """
    weight, hessian = synthetic_layer(64, 96, seed=seed)
    exact = solve(weight, hessian, DSFConfig(density=0.5))
    single = solve(weight.float(), hessian.float(), DSFConfig(density=0.5))
    assert single.factors["A"].dtype == torch.float32 and single.nnz == exact.nnz
    assert single.error == pytest.approx(exact.error, rel=0.1)


@pytest.mark.parametrize(
    "shape,density", [((64, 96), 0.5), ((96, 64), 0.3), ((48, 48), 0.45)], ids=["wide", "tall", "square"]
)
def test_finalize_never_hurts(shape: tuple[int, int], density: float) -> None:
    weight, hessian = synthetic_layer(*shape, seed=2)
    weight, hessian = weight.float(), hessian.float()
    final = solve(weight, hessian, DSFConfig(density=density, iters=15))
    stage1 = solve(weight, hessian, DSFConfig(density=density, iters=15, finalize=False))
    assert torch.equal(final.masks["A"], stage1.masks["A"]) and torch.equal(final.factors["B"], stage1.factors["B"])
    assert final.error <= stage1.error


def test_error_falls_with_iterations() -> None:
    weight, hessian = synthetic_layer(64, 96, seed=3)
    weight, hessian = weight.float(), hessian.float()
    errors = [solve(weight, hessian, DSFConfig(density=0.5, iters=iters)).error for iters in (1, 4, 10, 20, 40)]
    assert errors == sorted(errors, reverse=True), errors


def test_finalize_reaches_fixed_mask_least_squares_optimum() -> None:
    """With enough ADMM steps, finalize gives A = argmin tr((A·B − W)H(A·B − W)ᵀ) over A's support (B fixed)."""
    weight, hessian = synthetic_layer(10, 14, samples=64, seed=4)
    result = solve(weight, hessian, DSFConfig(density=0.6, iters=6, finalize_iters=4000))
    left, right, mask = result.factors["A"], result.factors["B"], result.masks["A"]
    expected = torch.zeros_like(left)
    for row in range(left.shape[0]):
        support = mask[row].nonzero().flatten()
        basis = right[support]  # [s, in]
        normal = basis @ hessian @ basis.T
        expected[row, support] = torch.linalg.solve(normal, basis @ hessian @ weight[row])
    torch.testing.assert_close(left, expected, rtol=1e-6, atol=1e-8)


def test_group_matches_single_layers() -> None:
    """Batched same-shape members (k, v) and a different-shape member (q) equal per-layer solves."""
    _, hessian = synthetic_layer(8, 48, seed=0)
    weights = [synthetic_layer(out, 48, seed=seed)[0] for out, seed in [(64, 1), (24, 2), (24, 3)]]
    config = DSFConfig(density=0.5, iters=12)
    grouped = solve_group(weights, hessian, config, layer_names=["q", "k", "v"])
    for weight, result in zip(weights, grouped):
        alone = solve(weight, hessian, config)
        assert torch.equal(result.masks["A"], alone.masks["A"]) and torch.equal(result.masks["B"], alone.masks["B"])
        torch.testing.assert_close(result.factors["A"], alone.factors["A"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(result.factors["B"], alone.factors["B"], rtol=1e-9, atol=1e-11)
        assert result.error == pytest.approx(alone.error, rel=1e-9)


def test_group_float32_matches_single_layers() -> None:
    """In fp32 batching changes rounding only; see ``test_float32_close_to_float64`` for the tolerance."""
    _, hessian = synthetic_layer(8, 40, seed=0)
    weights = [synthetic_layer(32, 40, seed=seed)[0].float() for seed in (1, 2)]
    config = DSFConfig(density=0.5, iters=10)
    grouped = solve_group(weights, hessian.float(), config)
    for weight, result in zip(weights, grouped):
        assert result.error == pytest.approx(solve(weight, hessian.float(), config).error, rel=0.1)


def test_batches_are_same_shape_sets_and_large_layers_alone() -> None:
    # LLaMA-2-70B groups: q | k, v (same shape, batched) | gate, up (28672×8192 > 2^26: alone)
    assert solve_batches([(8192, 8192), (1024, 8192), (1024, 8192)]) == [[0], [1, 2]]
    assert solve_batches([(28672, 8192), (28672, 8192)]) == [[0], [1]]
    assert solve_batches([(24, 48), (64, 48), (24, 48)]) == [[0, 2], [1]]
    side = int(BATCH_MAX_ELEMENTS**0.5)
    assert solve_batches([(side, side)] * 2) == [[0, 1]]  # exactly the limit still batches
    assert solve_batches([(side, side + 1)] * 2) == [[0], [1]]


def test_group_solves_large_layers_one_at_a_time(monkeypatch) -> None:
    """Above the batching limit every member is solved alone (stacks of one), bit-equal to its own solve."""
    _, hessian = synthetic_layer(8, 48, seed=0)
    weights = [synthetic_layer(24, 48, seed=seed)[0].float() for seed in (1, 2)]
    config = DSFConfig(density=0.5, iters=6)
    stack_sizes = []
    solve_stack = dsf._solve_stack

    def recording(stack, *args):
        stack_sizes.append(stack.shape[0])
        return solve_stack(stack, *args)

    monkeypatch.setattr(dsf, "_solve_stack", recording)
    solve_group(weights, hessian.float(), config)
    assert stack_sizes == [2]
    monkeypatch.setattr(dsf, "BATCH_MAX_ELEMENTS", 24 * 48 - 1)
    grouped = solve_group(weights, hessian.float(), config)
    assert stack_sizes == [2, 1, 1]
    for weight, result in zip(weights, grouped):
        alone = solve(weight, hessian.float(), config)
        assert torch.equal(result.factors["A"], alone.factors["A"]) and torch.equal(result.factors["B"],
                                                                                     alone.factors["B"])


def test_square_density_option() -> None:
    weight, hessian = synthetic_layer(32, 80)
    result = solve(weight, hessian, DSFConfig(density=0.5, iters=3, square_density=0.3))
    assert int(result.masks["A"].sum()) == int(32 * 32 * 0.3)
    assert result.nnz == nnz_budget((32, 80), 0.5)


def test_density_below_ceiling() -> None:
    weight, hessian = synthetic_layer(48, 48)
    with pytest.raises(ValueError) as info:
        solve(weight, hessian, DSFConfig(density=0.16), layer_name="blk.3.o")
    assert str(info.value) == (
        "layer 'blk.3.o': density=0.16 is too low for DSF on a 48×48 layer: the 48×48 square factor alone takes "
        "368 of the 368 non-zeros; the minimum density is 0.16059 (maximum sparsity 0.83941); "
        "raise the density or lower square_density"
    )
    result = solve(weight, hessian, DSFConfig(density=0.1606, iters=2))
    assert result.nnz == nnz_budget((48, 48), 0.1606)


def test_zero_weight_raises_clearly() -> None:
    with pytest.raises(RuntimeError) as info:
        solve(torch.zeros(16, 24), torch.eye(24), DSFConfig(density=0.5, iters=2), layer_name="blk.0.up")
    assert str(info.value) == (
        "DSF failed on 'blk.0.up': a Gram matrix was not positive definite (an all-zero weight, all inputs dead, "
        "or a non-PSD H); check the weight and the calibration Hessian"
    )


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def _restore_tf32():
    """Put the process-wide TF32 flags back after the test, whatever it set them to."""
    saved = _tf32_flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("_restore_tf32")
@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("flags", [(True, True), (True, False)], ids=["both-on", "cudnn-off"])
def test_tf32_off_inside_the_solve_and_restored(
    monkeypatch: pytest.MonkeyPatch, flags: tuple[bool, bool], raises: bool
) -> None:
    """With the caller's TF32 flags at non-default values, the solve runs with both off and the caller's exact
    values come back afterwards, also when the solve raises (a failed factorization)."""
    from compress.solvers import dsf

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    seen = []
    solve_stack = dsf._solve_stack

    def observed(*args, **kwargs):
        seen.append(_tf32_flags())
        if raises:
            raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
        return solve_stack(*args, **kwargs)

    monkeypatch.setattr(dsf, "_solve_stack", observed)
    weight, hessian = synthetic_layer(16, 24)
    if raises:
        with pytest.raises(RuntimeError, match="not positive definite"):
            solve(weight.float(), hessian.float(), DSFConfig(density=0.5, iters=2))
    else:
        result = solve(weight.float(), hessian.float(), DSFConfig(density=0.5, iters=2))
        assert result.nnz == nnz_budget((16, 24), 0.5)
    assert seen == [(False, False)]
    assert _tf32_flags() == flags


def test_matches_reference_port_large_factors() -> None:
    """Factors of >= 32768 entries take the CPU bracket selection path; still the reference's masks."""
    weight, hessian = synthetic_layer(192, 200, seed=5)
    result = solve(weight, hessian, DSFConfig(density=0.5, iters=5))
    _, a_ref, b_ref = reference.factorize(weight, hessian, 0.5, iters=5)
    assert torch.equal(result.masks["A"], a_ref != 0) and torch.equal(result.masks["B"], b_ref != 0)
    torch.testing.assert_close(result.factors["A"], a_ref, rtol=1e-9, atol=1e-11)


def _group_counts(matrix: torch.Tensor, group: int) -> torch.Tensor:
    """Non-zeros of every full group of ``group`` consecutive columns, [rows, cols // group]."""
    full = matrix.shape[1] // group * group
    return (matrix[:, :full] != 0).reshape(matrix.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (48, 48), (40, 70)])
@pytest.mark.parametrize("group", [16, 8])
def test_balanced_factors_keep_n_per_group(shape: tuple[int, int], group: int) -> None:
    from compress.solvers.split import propose_balanced_split

    weight, hessian = synthetic_layer(*shape, dtype=torch.float32)
    result = solve(weight, hessian, DSFConfig(density=0.5, iters=6, group_size=group))
    split = propose_balanced_split(shape, 0.5, group)
    for name in ("A", "B"):
        mask, factor, per_group = result.masks[name], result.factors[name], split[f"N_{name}"]
        assert torch.equal(_group_counts(mask, group), torch.full_like(_group_counts(mask, group), per_group)), name
        tail = mask.shape[1] % group
        if tail:
            assert torch.all(mask[:, -tail:].sum(1) == min(per_group, tail)), name
        # Values vanish only inside the mask (an inner index no row of the other factor uses), never outside.
        assert not torch.any(factor[~mask]), name
    assert result.nnz == split["nnz"] <= nnz_budget(shape, 0.5)
    assert result.error == pytest.approx(layer_error(weight, result.weight(), hessian)[0], rel=1e-6)


def test_balanced_costs_error_but_beats_magnitude() -> None:
    weight, hessian = synthetic_layer(64, 96, dtype=torch.float32)
    free = solve(weight, hessian, DSFConfig(density=0.5, iters=10))
    balanced = solve(weight, hessian, DSFConfig(density=0.5, iters=10, group_size=16))
    magnitude = solve(weight, hessian, make_config("magnitude", 0.5))
    assert free.relative_error <= balanced.relative_error < magnitude.relative_error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"group_size": 1}, "group_size must be None or in 2..16 (4-bit in-group indices), got 1"),
        ({"group_size": 17}, "group_size must be None or in 2..16 (4-bit in-group indices), got 17"),
        (
            {"group_size": 16, "fixmask": True},
            "fixmask and group_size exclude each other: a random fixed mask is not balanced",
        ),
    ],
)
def test_balanced_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        DSFConfig(density=0.5, **options)
    assert str(info.value) == message


def test_balanced_density_too_low_names_layer() -> None:
    weight, hessian = synthetic_layer(16, 64, dtype=torch.float32)  # 0.07 suits DSF, not 1 per group (80 > 71)
    with pytest.raises(ValueError) as info:
        solve(weight, hessian, DSFConfig(density=0.07, iters=2, group_size=16), layer_name="l")
    assert str(info.value) == (
        "layer 'l': density 0.07 of a 16x64 layer cannot give each factor one non-zero per group of 16; "
        "raise the density or use a smaller group"
    )
