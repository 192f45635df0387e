"""dsf_fused_matmul: one-launch DSF decode, against float64; the counters reset for the next call."""

import pytest
import torch

from dsf_runtime.kernels import pack_nibble
from dsf_runtime.kernels.dsf_fused_matmul import _counters, dsf_fused_matmul, dsf_fused_matmul_reference
from tests.dsf_runtime.kernels.conftest import balanced_random, rel_err


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_matches_reference_twice(device, tokens):
    gen = torch.Generator().manual_seed(tokens)
    A, B = balanced_random(45, 37, 3, gen=gen), balanced_random(37, 70, 6, gen=gen)  # odd shapes
    A[3] = 0  # empty row
    kA, kB = pack_nibble(A, 3).to(device), pack_nibble(B, 6).to(device)
    bias = torch.randn(45, generator=gen).half().to(device)
    cfg = {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": True}
    for _ in range(2):  # second launch must see reset counters
        x = torch.randn(tokens, 70, generator=gen).half().to(device)
        y = dsf_fused_matmul(x, kA, kB, bias, config_a=cfg if tokens == 1 else None,
                             config_b=cfg if tokens == 1 else None)
        assert rel_err(y, dsf_fused_matmul_reference(x.cpu(), kA.to("cpu"), kB.to("cpu"), bias.cpu())) <= 1e-2
        assert _counters(torch.device(device)).tolist() == [0, 0]


def test_errors(device):
    k = pack_nibble(torch.eye(4, dtype=torch.float16), 1).to(device)
    with pytest.raises(ValueError, match="handles 1..16 tokens"):
        dsf_fused_matmul(torch.zeros(17, 4, dtype=torch.float16, device=device), k, k)
    with pytest.raises(ValueError, match=r"x must be \[T, 4\]"):
        dsf_fused_matmul(torch.zeros(1, 5, dtype=torch.float16, device=device), k, k)
