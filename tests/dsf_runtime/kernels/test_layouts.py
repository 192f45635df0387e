"""Kernel layouts: exact round trips, balancing, errors (pure torch, fast)."""

import pytest
import torch

from dsf_runtime.kernels import balance_mask, group_counts, is_balanced, pack_delta, pack_dense, pack_nibble
from dsf_runtime.kernels.layouts import DELTA_CHUNK, NIBBLE_CHUNK, ROW_PAD
from tests.dsf_runtime.kernels.conftest import balanced_random, sparse_random


@pytest.mark.parametrize("rows,cols,n,g", [(37, 53, 5, 16), (16, 128, 8, 16), (5, 30, 3, 10), (3, 7, 1, 16)])
def test_nibble_round_trip(rows, cols, n, g):
    gen = torch.Generator().manual_seed(rows * cols)
    w = balanced_random(rows, cols, n, g, gen=gen)
    w[1] = 0  # an empty row
    k = pack_nibble(w, n, g)
    assert k.values.shape == (-(-rows // ROW_PAD) * ROW_PAD, k.slots) and k.slots % NIBBLE_CHUNK == 0
    assert k.index.dtype == torch.uint8 and k.index.shape == (k.values.shape[0], k.slots // 2)
    assert torch.equal(k.to_dense(), w)
    assert k.nnz == int((w != 0).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_delta_round_trip_unstructured(dtype):
    gen = torch.Generator().manual_seed(1)
    w = sparse_random(29, 301, 0.2, dtype, gen=gen)
    w[3] = 0
    w[5, :] = 0
    w[5, 300] = 1.0  # one far entry: fillers bridge the 300-column gap
    k = pack_delta(w)
    assert k.row_ptr.dtype == torch.int32 and bool((k.row_ptr % DELTA_CHUNK == 0).all())
    assert torch.equal(k.to_dense(), w)


def test_dense_round_trip():
    w = torch.randn(4, 6, dtype=torch.float16)
    assert torch.equal(pack_dense(w).to_dense(), w)


def test_balance_mask_counts():
    s = torch.randn(8, 40)
    m = balance_mask(s, 3, 16)
    counts = group_counts(m, 16)
    assert counts[:, :2].eq(3).all() and counts[:, 2].eq(3).all()  # last group has 8 columns, keeps 3
    # the kept entries are the largest of each group
    g0 = s[:, :16].abs()
    assert torch.equal(m[:, :16], g0 >= g0.topk(3, dim=1).values[:, -1:])
    assert is_balanced(m.float(), 16, 3) and not is_balanced(m.float(), 16, 2)


def test_pack_nibble_rejects_unbalanced():
    w = torch.zeros(2, 32, dtype=torch.float16)
    w[1, 16:22] = 1.0
    with pytest.raises(ValueError, match=r"row 1 group 1 \(columns 16\.\.31\) holds 6 non-zeros > per_group=4"):
        pack_nibble(w, 4)


def test_group_argument_checked():
    with pytest.raises(ValueError, match="group must be in 1..16"):
        pack_nibble(torch.zeros(2, 2), 1, group=17)
