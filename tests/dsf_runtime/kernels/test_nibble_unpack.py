"""nibble_unpack: exact dense copy, every element written."""

import pytest
import torch

from dsf_runtime.formats import NibbleMatrix
from dsf_runtime.kernels.nibble_unpack import nibble_unpack, nibble_unpack_reference
from tests.dsf_runtime.kernels.conftest import balanced_random


@pytest.mark.parametrize("rows,cols,n,g", [(19, 75, 6, 16), (8, 50, 3, 10)])
def test_exact(device, rows, cols, n, g):
    w = balanced_random(rows, cols, n, g, gen=torch.Generator().manual_seed(rows))
    k = NibbleMatrix.from_dense(w, per_group=n, group=g).to(device)
    out = torch.full((rows, cols), float("nan"), dtype=torch.float16, device=device)
    nibble_unpack(k, out=out)
    assert torch.equal(out.cpu(), w) and torch.equal(nibble_unpack_reference(k.to("cpu")), w)


def test_strided_out_and_dtype(device):
    w = balanced_random(5, 33, 2, gen=torch.Generator().manual_seed(1))
    k = NibbleMatrix.from_dense(w, per_group=2).to(device)
    buf = torch.full((5, 40), float("nan"), dtype=torch.float32, device=device)
    nibble_unpack(k, out=buf[:, :33])
    assert torch.equal(buf[:, :33].cpu(), w.float()) and buf[:, 33:].isnan().all()


def test_row_range(device):
    w = balanced_random(21, 40, 3, gen=torch.Generator().manual_seed(2))
    k = NibbleMatrix.from_dense(w, per_group=3).to(device)
    assert torch.equal(nibble_unpack(k, row_start=5, row_stop=17).cpu(), w[5:17])
    with pytest.raises(ValueError, match="row range 5:30 is outside 0:21"):
        nibble_unpack(k, row_start=5, row_stop=30)
