"""GPU layouts ``nibble`` and ``delta`` as formats: exact round trips, balancing, validation errors (pure torch)."""

import dataclasses

import pytest
import torch

from dsf_runtime.formats import (
    CSRMatrix,
    DeltaMatrix,
    DenseMatrix,
    FormatError,
    NibbleMatrix,
    from_meta,
    kernel_layout,
    pack,
)
from dsf_runtime.formats.nibble import CHUNK, ROW_PAD, balance_mask, group_counts
from tests.dsf_runtime.kernels.conftest import balanced_random, sparse_random


@pytest.mark.parametrize("rows,cols,n,g", [(37, 53, 5, 16), (16, 128, 8, 16), (5, 30, 3, 10), (3, 7, 1, 16)])
def test_nibble_round_trip(rows, cols, n, g):
    gen = torch.Generator().manual_seed(rows * cols)
    w = balanced_random(rows, cols, n, g, gen=gen)
    w[1] = 0  # an empty row
    k = NibbleMatrix.from_dense(w, per_group=n, group=g)
    assert k.values.shape == (-(-rows // ROW_PAD) * ROW_PAD, k.slots) and k.slots % CHUNK == 0
    assert k.index.dtype == torch.uint8 and k.index.shape == (k.values.shape[0], k.slots // 2)
    assert torch.equal(k.to_dense(), w) and torch.equal(k.dense_rows(2, rows), w[2:])
    assert k.nnz == int((w != 0).sum())
    k.validate("m")
    back = from_meta(k.to_tensors("m"), "m", k.meta())
    assert (back.group, back.per_group) == (g, n) and torch.equal(back.to_dense(), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_delta_round_trip_unstructured(dtype):
    gen = torch.Generator().manual_seed(1)
    w = sparse_random(29, 301, 0.2, dtype, gen=gen)
    w[3] = 0
    w[5, :] = 0
    w[5, 300] = 1.0  # one far entry: fillers bridge the 300-column gap
    k = DeltaMatrix.from_dense(w)
    assert k.row_ptr.dtype == torch.int32 and bool((k.row_ptr % 32 == 0).all())
    assert torch.equal(k.to_dense(), w) and torch.equal(k.dense_rows(4, 9), w[4:9])
    k.validate("m")
    assert torch.equal(from_meta(k.to_tensors("m"), "m", k.meta()).to_dense(), w)


@pytest.mark.parametrize("cls", [NibbleMatrix, DeltaMatrix])
def test_matmul_pure_torch_matches_float64(cls):
    gen = torch.Generator().manual_seed(5)
    w = sparse_random(21, 70, 0.3, torch.float32, gen=gen)
    x = torch.randn(2, 3, 70, generator=gen, dtype=torch.float64)
    y = cls.from_dense(w).matmul(x.float(), torch.float64)
    assert y.shape == (2, 3, 21) and torch.allclose(y, x @ w.double().T, rtol=1e-5, atol=1e-5)


def test_from_packed_and_kernel_layout():
    gen = torch.Generator().manual_seed(2)
    bal, uns, dense = balanced_random(32, 1024, 5, gen=gen), sparse_random(32, 256, 0.3, gen=gen), sparse_random(
        32, 64, 0.95, gen=gen)
    assert type(kernel_layout(pack(bal, "csr"))) is NibbleMatrix
    assert type(kernel_layout(pack(uns, "bitmask"))) is DeltaMatrix
    assert type(kernel_layout(pack(dense, "csr"))) is DenseMatrix
    k = NibbleMatrix.from_packed(pack(bal, "bitmask"))
    assert torch.equal(k.to_dense(), bal) and kernel_layout(k) is k  # stored kernel layouts are kept as they are
    assert kernel_layout(k, torch.float32).dtype == torch.float32
    assert torch.equal(DeltaMatrix.from_packed(CSRMatrix.from_dense(uns)).to_dense(), uns)


def test_balance_mask_counts():
    s = torch.randn(8, 40)
    m = balance_mask(s, 3, 16)
    counts = group_counts(m, 16)
    assert counts[:, :2].eq(3).all() and counts[:, 2].eq(3).all()  # last group has 8 columns, keeps 3
    g0 = s[:, :16].abs()
    assert torch.equal(m[:, :16], g0 >= g0.topk(3, dim=1).values[:, -1:])  # the largest of each group


def test_nibble_rejects_unbalanced_and_bad_group():
    w = torch.zeros(2, 32, dtype=torch.float16)
    w[1, 16:22] = 1.0
    with pytest.raises(ValueError, match=r"row 1 group 1 \(columns 16\.\.31\) holds 6 non-zeros > per_group=4"):
        NibbleMatrix.from_dense(w, per_group=4)
    with pytest.raises(ValueError, match="group must be an integer in 1..16"):
        NibbleMatrix.from_dense(torch.zeros(2, 2), per_group=1, group=17)


def _nibble() -> NibbleMatrix:
    gen = torch.Generator().manual_seed(7)
    return NibbleMatrix.from_dense(balanced_random(20, 50, 3, gen=gen), per_group=3)


def test_nibble_validation_names_the_tensor():
    k = _nibble()
    values = k.values.clone()
    values[25, 0] = 1.0  # a pad row
    with pytest.raises(FormatError, match=r"'m\.values' holds non-zeros in its padding"):
        dataclasses.replace(k, values=values).validate("m")
    index = k.index.clone()
    index[0, 0] = (index[0, 0] & 0xF0) | 15  # slot 0 points to column 15 while slot 1 points lower
    with pytest.raises(FormatError, match=r"'m\.index' row 0 group 0 does not hold its non-zeros first"):
        dataclasses.replace(k, index=index).validate("m")
    with pytest.raises(FormatError, match=r"'m\.index' cannot be read: per_group must be an integer"):
        dataclasses.replace(k, per_group=40).validate("m")
    with pytest.raises(FormatError, match=r"'m\.values' has shape \[32, 32\], expected \[32, 64\]"):
        dataclasses.replace(k, per_group=9).validate("m")  # the manifest's per_group disagrees with the tensors
    narrow = NibbleMatrix.from_dense(torch.ones(16, 3), per_group=3)
    index = narrow.index.clone()
    index[0, 2] = 9  # slot 2 of row 0 -> column 9 of a 3-column matrix
    with pytest.raises(FormatError, match=r"row 0 group 0 points a non-zero past its group or column 2"):
        dataclasses.replace(narrow, index=index).validate("m")


def test_delta_validation_names_the_tensor():
    w = torch.zeros(3, 40)
    w[0, 2], w[2, 39] = 1.0, 2.0
    k = DeltaMatrix.from_dense(w)
    row_ptr = k.row_ptr.clone()
    row_ptr[1] = 16
    with pytest.raises(FormatError, match=r"'m\.row_ptr' holds an offset that is not a multiple of 32"):
        dataclasses.replace(k, row_ptr=row_ptr).validate("m")
    index = k.index.clone()
    index[k.row_ptr[2] // 2 :] = 0xFF  # row 2: every delta 15 -> its non-zero lands past column 39
    with pytest.raises(FormatError, match=r"'m\.index' puts the non-zero entry .* outside \[0, 40\)"):
        dataclasses.replace(k, index=index).validate("m")
    with pytest.raises(FormatError, match=r"'m\.row_ptr' ends at"):
        dataclasses.replace(k, values=k.values[:32], index=k.index[:16]).validate("m")
