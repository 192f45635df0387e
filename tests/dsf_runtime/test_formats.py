"""Pack/unpack round trips of every layout: property-based, edge cases, DSF inner-dimension dropping, LLM sizes."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsf_runtime.formats import (
    AUTO_LAYOUTS,
    LAYOUTS,
    BitmaskMatrix,
    BSRMatrix,
    CSRMatrix,
    DenseMatrix,
    from_meta,
    pack,
    pack_factors,
)
from tests.dsf_runtime.helpers import assert_bits_equal, random_sparse, single_thread  # noqa: F401 (autouse fixture)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _opts(layout: str, block: int = 16) -> dict:
    return {"block_size": block} if layout == "bsr" else {}


@st.composite
def matrices(draw, max_side: int = 70) -> torch.Tensor:
    """Random matrices with empty rows/columns, all-zero and all-dense cases and special values."""
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    density = draw(st.sampled_from([0.0, 0.02, 0.3, 0.7, 1.0]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    m = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    if draw(st.booleans()):
        m[torch.rand(rows, generator=g) < 0.3] = 0
        m[:, torch.rand(cols, generator=g) < 0.3] = 0
    m = m.to(dtype)
    if draw(st.booleans()):
        special = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40, 6e-8, 3e38]).to(dtype)
        where = torch.randint(0, rows * cols, (special.numel(),), generator=g)
        m.view(-1)[where] = special
    return m


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matrix=matrices(), layout=st.sampled_from(sorted(LAYOUTS)), block=st.sampled_from([16, 32, 64]))
def test_round_trip_is_bit_exact(matrix: torch.Tensor, layout: str, block: int) -> None:
    packed = pack(matrix, layout, **_opts(layout, block))
    packed.validate("m")
    assert packed.shape == tuple(matrix.shape) and packed.dtype == matrix.dtype
    assert_bits_equal(packed.to_dense(), matrix)
    assert packed.nnz == int(torch.count_nonzero(matrix))
    rebuilt = from_meta(packed.to_tensors("p.A"), "p.A", packed.meta())
    assert_bits_equal(rebuilt.to_dense(), matrix)
    start = matrix.shape[0] // 3
    assert_bits_equal(packed.dense_rows(start, matrix.shape[0]), packed.to_dense()[start:])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shape", [(1, 1), (0, 5), (5, 0), (0, 0), (3, 8), (17, 33)])
@pytest.mark.parametrize("fill", ["zeros", "ones"])
def test_edge_shapes(layout: str, shape: tuple[int, int], fill: str) -> None:
    matrix = (torch.zeros if fill == "zeros" else torch.ones)(shape, dtype=torch.bfloat16)
    packed = pack(matrix, layout, **_opts(layout))
    packed.validate()
    assert torch.equal(packed.to_dense(), matrix)
    assert packed.nnz == matrix.count_nonzero()


def test_negative_zero_unpacks_as_zero() -> None:
    matrix = torch.tensor([[-0.0, 1.0]], dtype=torch.float16)
    for layout in ("csr", "bitmask"):
        packed = pack(matrix, layout)
        assert packed.nnz == 1 and torch.equal(packed.to_dense(), torch.tensor([[0.0, 1.0]], dtype=torch.float16))


def test_dtype_cast_drops_underflowing_values() -> None:
    matrix = torch.tensor([[1e-10, 2.0]], dtype=torch.float32)
    packed = pack(matrix, "csr", dtype=torch.float16)
    assert packed.nnz == 1 and packed.values.dtype == torch.float16


def test_csr_index_dtype_follows_width() -> None:
    assert pack(torch.ones(2, 32768), "csr").col_idx.dtype == torch.int16
    wide = torch.zeros(2, 40000)
    wide[1, 39999] = 3.0
    packed = pack(wide, "csr")
    assert packed.col_idx.dtype == torch.int32 and packed.col_idx.tolist() == [39999]
    assert packed.meta()["index_dtype"] == "int32" and torch.equal(packed.to_dense(), wide)


def test_bitmask_layout_matches_spec() -> None:
    matrix = torch.zeros(2, 10)
    matrix[0, 0], matrix[0, 9], matrix[1, 3] = 1.0, 2.0, 3.0
    packed = BitmaskMatrix.from_dense(matrix)
    assert packed.bitmask.tolist() == [[0b00000001, 0b00000010], [0b00001000, 0]]
    assert packed.values.tolist() == [1.0, 2.0, 3.0] and packed.row_ptr.tolist() == [0, 2, 3]


def test_bsr_layout_matches_spec() -> None:
    matrix = torch.zeros(20, 40)
    matrix[0, 35] = 1.0
    matrix[19, 0] = 2.0
    packed = BSRMatrix.from_dense(matrix, block_size=16)
    assert packed.values.shape == (2, 16, 16) and packed.col_idx.tolist() == [2, 0]
    assert packed.row_ptr.tolist() == [0, 1, 2] and packed.meta()["block_size"] == 16
    assert packed.values[0, 0, 3] == 1.0 and packed.values[1, 3, 0] == 2.0


def test_meta_and_nbytes() -> None:
    matrix = random_sparse(64, 48, 0.3).half()
    nnz = int(matrix.count_nonzero())
    expected_bytes = {
        "dense": 64 * 48 * 2,
        "csr": nnz * 2 + nnz * 2 + 65 * 4,
        "bitmask": nnz * 2 + 64 * 6 + 65 * 4,
    }
    for layout, nbytes in expected_bytes.items():
        packed = pack(matrix, layout)
        assert packed.nbytes == nbytes
        assert packed.meta() == {
            "shape": [64, 48], "layout": layout, "dtype": "float16", "nnz": nnz,
            "index_dtype": "int16" if layout == "csr" else None, "block_size": None,
            "bit_order": "little" if layout == "bitmask" else None,
        }


def test_to_moves_and_casts_values_only() -> None:
    packed = pack(random_sparse(8, 8, 0.5), "csr").to("cpu", torch.bfloat16)
    assert packed.values.dtype == torch.bfloat16 and packed.col_idx.dtype == torch.int16


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown layout 'coo'"):
        pack(torch.ones(2, 2), "coo")
    with pytest.raises(TypeError, match="values must be one of"):
        pack(torch.ones(2, 2, dtype=torch.float64), "csr")
    with pytest.raises(ValueError, match="expected a 2-D tensor"):
        pack(torch.ones(2), "dense")
    with pytest.raises(ValueError, match="block_size must be one of"):
        pack(torch.ones(2, 2), "bsr", block_size=8)


def _kept_inner(A: torch.Tensor, B: torch.Tensor) -> list[int]:
    return [t for t in range(A.shape[1]) if bool(A[:, t].any()) and bool(B[t].any())]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pack_factors_drops_empty_inner_indices(layout: str) -> None:
    A, B = random_sparse(12, 10, 0.5, seed=1), random_sparse(10, 20, 0.5, seed=2)
    A[:, 3] = 0
    B[5] = 0
    B[7] = 0
    keep = _kept_inner(A, B)
    packed = pack_factors(A, B, layout, dtype=torch.float16, **_opts(layout))
    assert packed["A"].shape == (12, len(keep)) and packed["B"].shape == (len(keep), 20)
    assert torch.equal(packed["A"].to_dense(), A[:, keep].half())
    assert torch.equal(packed["B"].to_dense(), B[keep].half())
    kept_all = pack_factors(A, B, layout, drop_empty=False, **_opts(layout))
    assert kept_all["A"].shape == (12, 10)


def test_pack_factors_all_empty_and_mismatch() -> None:
    packed = pack_factors(torch.zeros(4, 3), torch.ones(3, 5), "bitmask")
    assert packed["A"].shape == (4, 0) and packed["B"].shape == (0, 5)
    assert torch.equal(packed["A"].to_dense() @ packed["B"].to_dense(), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"factors do not chain: A is \[4, 3\], B is \[4, 5\]"):
        pack_factors(torch.zeros(4, 3), torch.ones(4, 5), "csr")


@pytest.fixture(scope="module")
def llama_matrix() -> torch.Tensor:
    """fp16 11008×4096 at about 50% density."""
    matrix = torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    return matrix.masked_fill_(matrix.abs() < 0.6745, 0)


@pytest.mark.parametrize("cls", [DenseMatrix, CSRMatrix, BitmaskMatrix, BSRMatrix])
def test_llama_sized_pack_is_fast(cls: type, llama_matrix: torch.Tensor) -> None:
    start = time.perf_counter()
    torch.nonzero(llama_matrix.reshape(-1))
    reference = time.perf_counter() - start  # one pass of the dominant primitive, to scale for machine load
    start = time.perf_counter()
    packed = cls.from_dense(llama_matrix)
    elapsed = time.perf_counter() - start
    assert packed.nnz == int(torch.count_nonzero(llama_matrix))
    # Vectorized packing costs a few such passes (~0.2-0.6 s on an idle 2-core machine).
    assert elapsed < 0.5 + 6 * reference, f"{cls.__name__}: {elapsed:.2f} s (reference {reference:.2f} s)"


def test_docstring_examples() -> None:
    import doctest

    import dsf_runtime.formats

    assert doctest.testmod(dsf_runtime.formats, raise_on_error=True).attempted > 0


def test_auto_packs_into_the_smallest_layout() -> None:
    cases = [(torch.randn(64, 200), DenseMatrix), (random_sparse(64, 200, 0.02, seed=1), CSRMatrix),
             (random_sparse(64, 200, 0.3, seed=2), BitmaskMatrix)]
    for matrix, expected in cases:
        packed = pack(matrix, "auto", dtype=torch.float16)
        assert type(packed) is expected
        assert packed.nbytes == min(pack(matrix, layout, dtype=torch.float16).nbytes for layout in AUTO_LAYOUTS)
        assert torch.equal(packed.to_dense(), matrix.half())
