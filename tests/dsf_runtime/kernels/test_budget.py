"""propose_balanced_split: DSF budgets rounded to balanced groups."""

import pytest

from dsf_runtime.kernels import balanced_nnz, propose_balanced_split


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
