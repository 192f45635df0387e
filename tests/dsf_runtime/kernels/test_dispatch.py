"""dispatch.linear and modules.linear: every path, layout, token count (1..64 and larger), and the errors."""

import pytest
import torch

from dsf_runtime.formats import DeltaMatrix, DenseMatrix, NibbleMatrix, pack
from dsf_runtime.kernels import unavailable_reason
from dsf_runtime.kernels.dispatch import linear
from dsf_runtime.modules import linear as module_linear
from tests.dsf_runtime.kernels.conftest import balanced_random, rel_err, sparse_random

LAYOUT = {"nibble": NibbleMatrix, "delta": DeltaMatrix, "dense": DenseMatrix}


def _dsf(gen, m=24, r=20, n=40, dtype=torch.float16, balanced=True):
    if balanced:
        return balanced_random(m, r, 4, gen=gen, dtype=dtype), balanced_random(r, n, 6, gen=gen, dtype=dtype)
    return sparse_random(m, r, 0.25, dtype, gen=gen), sparse_random(r, n, 0.4, dtype, gen=gen)


def _ref(x, factors, bias=None):
    h = x.double().cpu()
    for f in reversed(factors):
        h = h @ f.double().cpu().t()
    return h if bias is None else h + bias.double().cpu()


def test_kernels_run_here(device):
    assert unavailable_reason(device) is None


@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 2), ("decode", 4), ("decode", 17),
                                         ("auto", 2), ("auto", 64), ("prefill", 33), ("materialize", 9)])
@pytest.mark.parametrize("balanced", [True, False])
def test_dsf_paths(device, path, tokens, balanced):
    gen = torch.Generator().manual_seed(tokens + 100 * balanced)
    A, B = _dsf(gen, balanced=balanced)
    cls = NibbleMatrix if balanced else DeltaMatrix
    kA, kB = cls.from_dense(A).to(device), cls.from_dense(B).to(device)
    x = torch.randn(tokens, 40, generator=gen).half().to(device)
    bias = torch.randn(24, generator=gen).half().to(device)
    y = linear(x, [kA, kB], bias, path=path)
    assert y.shape == (tokens, 24) and y.dtype == torch.float16
    assert rel_err(y, _ref(x, [A, B], bias)) <= 1e-2


@pytest.mark.parametrize("tokens", [*range(1, 18), 31, 32, 33, 64])
def test_token_counts(device, tokens):
    """The auto path for every decode token count (1..16 and the switch to prefill at 17) and a few larger,
    NaN-free against float64 (odd shapes, an empty row)."""
    gen = torch.Generator().manual_seed(tokens)
    A, B = balanced_random(19, 20, 4, gen=gen), sparse_random(20, 37, 0.4, gen=gen)
    A[3] = 0
    x = torch.randn(tokens, 37, generator=gen).half().to(device)
    y = linear(x, [NibbleMatrix.from_dense(A).to(device), DeltaMatrix.from_dense(B).to(device)])
    assert rel_err(y, _ref(x, [A, B])) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_leading_dims_and_dtype(device, dtype):
    gen = torch.Generator().manual_seed(9)
    A, B = _dsf(gen, dtype=dtype)
    kA, kB = NibbleMatrix.from_dense(A).to(device), NibbleMatrix.from_dense(B).to(device)
    x = torch.randn(2, 3, 40, generator=gen).to(dtype).to(device)
    y = linear(x, [kA, kB])
    assert y.shape == (2, 3, 24) and rel_err(y, _ref(x, [A, B])) <= (1e-2 if dtype == torch.float16 else 2e-2)
    y32 = linear(x.float(), [kA, kB], out_dtype=torch.float32)  # x cast to the factors' dtype, y in fp32
    assert y32.dtype == torch.float32 and rel_err(y32, _ref(x, [A, B])) <= 2e-2


@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 8), ("prefill", 20), ("auto", 3)])
@pytest.mark.parametrize("layout", ["nibble", "delta", "dense"])
def test_single_matrix(device, path, tokens, layout):
    if layout == "dense" and path == "decode":
        pytest.skip("dense matrices have no decode kernel (checked in test_errors)")
    gen = torch.Generator().manual_seed(tokens)
    w = balanced_random(37, 50, 8, gen=gen) if layout == "nibble" else sparse_random(37, 50, 0.5, gen=gen)
    x = torch.randn(tokens, 50, generator=gen).half().to(device)
    y = linear(x, [LAYOUT[layout].from_dense(w).to(device)], path=path)
    assert rel_err(y, _ref(x, [w])) <= 1e-2


def test_module_linear_takes_the_kernels_only_for_kernel_layouts(device, monkeypatch):
    """Kernel layouts go through dispatch.linear; a stored layout in the chain makes every factor use its own
    matmul (each kernel layout on its own kernel), with the same result."""
    from dsf_runtime.kernels import dispatch

    calls = []
    real = dispatch.linear
    monkeypatch.setattr(dispatch, "linear", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    gen = torch.Generator().manual_seed(11)
    A, B = _dsf(gen, balanced=False)
    x = torch.randn(5, 40, generator=gen).half().to(device)
    y = module_linear(x, [DeltaMatrix.from_dense(A).to(device), DeltaMatrix.from_dense(B).to(device)])
    assert calls == [2] and rel_err(y, _ref(x, [A, B])) <= 1e-2
    calls.clear()
    y = module_linear(x, [DeltaMatrix.from_dense(A).to(device), pack(B, "csr").to(device)])
    assert calls == [1] and rel_err(y, _ref(x, [A, B])) <= 1e-2


def test_zero_tokens(device):
    gen = torch.Generator().manual_seed(3)
    A, B = _dsf(gen)
    kA, kB = NibbleMatrix.from_dense(A).to(device), DeltaMatrix.from_dense(B).to(device)
    assert linear(torch.zeros(0, 40, dtype=torch.float16, device=device), [kA, kB]).shape == (0, 24)


def test_errors(device):
    gen = torch.Generator().manual_seed(4)
    A, B = _dsf(gen)
    kA, kB = NibbleMatrix.from_dense(A).to(device), NibbleMatrix.from_dense(B).to(device)
    x = torch.zeros(1, 40, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="factors do not chain"):
        linear(x, [kB, kA])
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 40\]"):
        linear(torch.zeros(1, 41, dtype=torch.float16, device=device), [kA, kB])
    with pytest.raises(ValueError, match="factors must share one device and compute dtype"):
        linear(x, [kA, kB.to(dtype=torch.float32)])
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        linear(x, [kA, kB], path="fast")
    with pytest.raises(ValueError, match=r"path 'decode' needs \['delta', 'nibble'\] factors"):
        linear(x, [kA, DenseMatrix.from_dense(B).to(device)], path="decode")
    with pytest.raises(ValueError, match=r"bias must be \[24\]"):
        linear(x, [kA, kB], torch.zeros(5, dtype=torch.float16, device=device))
