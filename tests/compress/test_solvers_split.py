"""DSF's factor split (``compress.solvers.split``): the square factor's density, its rounding to balanced groups,
and the one source both the solver and the split read; ``balanced_per_group`` and ``pack_factors`` at run time."""

import pytest
import torch

from compress.solvers import DSFConfig, solve
from compress.solvers import dsf as dsf_solver
from compress.solvers.split import balanced_nnz, propose_balanced_split, square_factor_density
from dsf_runtime.formats import pack_factors
from dsf_runtime.formats.balanced import balanced_per_group


def test_square_factor_density() -> None:
    assert square_factor_density(64, 64) == 0.16
    assert square_factor_density(64, 192) == square_factor_density(192, 64) == 0.25


@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008), (11008, 4096), (576, 576), (192, 576), (1536, 576)])
@pytest.mark.parametrize("density", [0.5, 0.3])
def test_split_within_budget(shape, density):
    p = propose_balanced_split(shape, density)
    m, n = shape
    assert p["nnz"] <= int(m * n * density) == p["budget"]
    assert p["nnz"] == balanced_nnz(*p["A_shape"], p["N_A"]) + balanced_nnz(*p["B_shape"], p["N_B"])
    assert p["A_shape"][1] == p["B_shape"][0] == min(m, n)
    assert p["square"] == ("A" if m < n else "B")
    assert 1 <= p["N_A"] <= 16 and 1 <= p["N_B"] <= 16
    assert p == propose_balanced_split(shape, density, square_density=square_factor_density(m, n))


def test_split_follows_dsf_ratio():
    assert propose_balanced_split((4096, 11008), 0.5)[("N_A")] == 4  # square factor at 0.25
    p = propose_balanced_split((4096, 4096), 0.5)
    assert (p["N_A"], p["N_B"]) == (5, 3)  # square factor B near 0.16, A the rest
    assert propose_balanced_split((4096, 4096), 0.3)["nnz"] <= 0.3 * 4096 * 4096


def test_split_errors():
    with pytest.raises(ValueError, match="cannot give each factor one non-zero per group"):
        propose_balanced_split((64, 64), 0.05)
    with pytest.raises(ValueError, match="density must be in"):
        propose_balanced_split((64, 64), 0.0)


@pytest.mark.parametrize("group_size", [None, 16])
def test_the_solver_reads_the_same_rule(monkeypatch: pytest.MonkeyPatch, group_size: int | None) -> None:
    """DSF's budgets (global and balanced) come from ``square_factor_density``: change it and the square factor
    ``A`` [16, 16] of a [16, 32] layer gets the new share."""
    generator = torch.Generator().manual_seed(0)
    weight, hessian = torch.randn(16, 32, generator=generator), torch.eye(32)
    config = DSFConfig(density=0.5, iters=2, finalize_iters=2, group_size=group_size)
    assert solve(weight, hessian, config).factors["A"].count_nonzero() == 0.25 * 16 * 16
    monkeypatch.setattr(dsf_solver, "square_factor_density", lambda m, n: 0.5)
    assert solve(weight, hessian, config).factors["A"].count_nonzero() == 0.5 * 16 * 16


def test_balanced_per_group() -> None:
    matrix = torch.zeros(3, 36)
    matrix[0, [0, 5, 16, 30]] = 1.0  # 2 per full group; the partial group (32..35) is not checked
    matrix[2, [1, 2, 20, 21, 33]] = 1.0
    assert balanced_per_group(matrix) == 2  # row 1 is empty: ignored
    matrix[2, 22] = 1.0
    assert balanced_per_group(matrix) is None
    assert balanced_per_group(torch.ones(2, 32)) is None  # 16 of 16 is dense, not balanced
    assert balanced_per_group(torch.ones(2, 8)) is None  # no full group


def test_pack_factors_keeps_balanced_inner_indices() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.zeros(8, 32)
    a[:, [0, 1, 17, 18]] = torch.randn(8, 4, generator=generator)  # 2 per group: balanced; columns 2..16 dead
    b = torch.randn(32, 20, generator=generator)
    assert pack_factors(a, b, "csr")["A"].shape == (8, 32)
    a[0, 5] = 1.0  # unbalanced now: the dead inner indices are dropped
    assert pack_factors(a, b, "csr")["A"].shape == (8, 5)
