"""nibble_matmul (balanced 4-bit layout) against a float64 reference on fresh random data, NaN-poisoned outputs."""

import pytest
import torch

from dsf_runtime.formats import NibbleMatrix
from dsf_runtime.kernels.nibble_matmul import nibble_matmul, nibble_matmul_reference
from dsf_runtime.kernels.pack_activations import pack_activations
from tests.dsf_runtime.kernels.conftest import balanced_random, rel_err

TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.mark.parametrize("tokens", [1, 3, 16, 19])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference(device, tokens, dtype):
    gen = torch.Generator().manual_seed(tokens * 7 + (dtype == torch.bfloat16))
    rows, cols, n = 37, 83, 5  # odd shapes: not multiples of any block
    w = balanced_random(rows, cols, n, gen=gen, dtype=dtype)
    w[4] = 0  # empty row
    k = NibbleMatrix.from_dense(w, per_group=n).to(device)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).to(device)
    bias = torch.randn(rows, generator=gen).to(dtype).to(device)
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=device)
    y = nibble_matmul(x, k, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, nibble_matmul_reference(x.cpu(), k.to("cpu"), bias.cpu())) <= TOL[dtype]


@pytest.mark.parametrize("cfg", [
    {"BN": 1, "BLOCK_R": 16, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},  # S % BLOCK_S != 0: masked steps
    {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": True, "CG": True},
    {"BN": 4, "BLOCK_R": 2, "BLOCK_S": 128, "num_warps": 4, "num_stages": 1, "XF32": True},
])
def test_configs_and_group_widths(device, cfg):
    gen = torch.Generator().manual_seed(3)
    rows, cols, n, g = 20, 101, 4, 10  # G = 10: non-power-of-two groups
    w = balanced_random(rows, cols, n, g, gen=gen)
    k = NibbleMatrix.from_dense(w, per_group=n, group=g).to(device)
    x = torch.randn(3, cols, generator=gen).half().to(device)
    y = nibble_matmul(x, k, config=cfg)
    assert rel_err(y, nibble_matmul_reference(x.cpu(), k.to("cpu"))) <= 1e-2


def test_packed_chain_fp32(device):
    """Packed input and packed fp32 output: what the DSF chain hands from factor B to factor A."""
    gen = torch.Generator().manual_seed(5)
    B = balanced_random(24, 40, 6, gen=gen)
    A = balanced_random(18, 24, 3, gen=gen)
    kB, kA = NibbleMatrix.from_dense(B, per_group=6).to(device), NibbleMatrix.from_dense(A, per_group=3).to(device)
    x = torch.randn(6, 40, generator=gen).half().to(device)
    xp = pack_activations(x, 4)
    z = nibble_matmul(xp, kB, n_tokens=6, out_dtype=torch.float32, packed_out=4)
    assert z.shape == (2, 24, 4) and z.dtype == torch.float32
    y = nibble_matmul(z, kA, n_tokens=6, out_dtype=torch.float16)
    ref = (x.double().cpu() @ B.double().t()) @ A.double().t()
    assert rel_err(y, ref) <= 1e-2


def test_errors():
    k = NibbleMatrix.from_dense(torch.eye(4, dtype=torch.float16), per_group=1)
    with pytest.raises(ValueError, match=r"x must be \[T, 4\] with unit column stride"):
        nibble_matmul(torch.zeros(2, 5, dtype=torch.float16), k)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        nibble_matmul(torch.zeros(2, 4, dtype=torch.int32), k)
    with pytest.raises(ValueError, match="a packed x"):
        nibble_matmul(torch.zeros(1, 4, 2, dtype=torch.float16), k)
    with pytest.raises(ValueError, match=r"bias must be \[4\]"):
        nibble_matmul(torch.zeros(2, 4, dtype=torch.float16), k, torch.zeros(3, dtype=torch.float16))
