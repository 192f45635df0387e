"""delta_matmul (unstructured 4-bit deltas) against a float64 reference, NaN-poisoned outputs."""

import pytest
import torch

from dsf_runtime.formats import DeltaMatrix
from dsf_runtime.kernels.delta_matmul import delta_matmul, delta_matmul_reference
from tests.dsf_runtime.kernels.conftest import rel_err, sparse_random


@pytest.mark.parametrize("tokens", [1, 5, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference(device, tokens, dtype):
    gen = torch.Generator().manual_seed(11 * tokens + (dtype == torch.bfloat16))
    rows, cols = 21, 333
    w = sparse_random(rows, cols, 0.25, dtype, gen=gen)
    w[2] = 0  # empty row
    w[7] = 0
    w[7, 320] = 2.0  # long gap bridged by fillers
    w[9, :200] = 0  # long leading gap
    k = DeltaMatrix.from_dense(w).to(device)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).to(device)
    bias = torch.randn(rows, generator=gen).to(dtype).to(device)
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=device)
    y = delta_matmul(x, k, bias, out=out)
    assert rel_err(y, delta_matmul_reference(x.cpu(), k.to("cpu"), bias.cpu())) <= (1e-2 if dtype == torch.float16 else 2e-2)


def test_block_config(device):
    gen = torch.Generator().manual_seed(2)
    w = sparse_random(13, 70, 0.6, gen=gen)
    k = DeltaMatrix.from_dense(w).to(device)
    x = torch.randn(2, 70, generator=gen).half().to(device)
    cfg = {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 64, "num_warps": 4, "num_stages": 1}
    assert rel_err(delta_matmul(x, k, config=cfg), delta_matmul_reference(x.cpu(), k.to("cpu"))) <= 1e-2


def test_wrong_layout():
    from dsf_runtime.formats import NibbleMatrix

    with pytest.raises(ValueError, match="delta_matmul needs a 'delta' matrix, got layout 'nibble'"):
        delta_matmul(torch.zeros(1, 4, dtype=torch.float16), NibbleMatrix.from_dense(torch.eye(4, dtype=torch.float16), per_group=1))
