"""delta_unpack: exact dense copy of an unstructured matrix, every element written."""

import torch

from dsf_runtime.formats import DeltaMatrix
from dsf_runtime.kernels.delta_unpack import delta_unpack, delta_unpack_reference
from tests.dsf_runtime.kernels.conftest import sparse_random


def test_exact(device):
    w = sparse_random(23, 140, 0.3, gen=torch.Generator().manual_seed(4))
    w[0] = 0
    w[1, :] = 0
    w[1, 139] = 1.0
    k = DeltaMatrix.from_dense(w).to(device)
    out = torch.full((23, 140), float("nan"), dtype=torch.float16, device=device)
    delta_unpack(k, out=out)
    assert torch.equal(out.cpu(), w) and torch.equal(delta_unpack_reference(k.to("cpu")), w)


def test_row_range(device):
    w = sparse_random(19, 70, 0.4, gen=torch.Generator().manual_seed(5))
    k = DeltaMatrix.from_dense(w).to(device)
    assert torch.equal(delta_unpack(k, row_start=3, row_stop=11).cpu(), w[3:11])
