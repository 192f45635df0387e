"""factorized_matmul / sparse_matmul / prepare_factor: every path, layout, token count and the errors."""

import pytest
import torch

from dsf_runtime.kernels import (
    choose_layout,
    factorized_matmul,
    kernels_available,
    prepare_factor,
    sparse_matmul,
    warmup,
)
from tests.dsf_runtime.kernels.conftest import balanced_random, rel_err, sparse_random


def _dsf(gen, m=24, r=20, n=40, dtype=torch.float16, balanced=True):
    if balanced:
        return balanced_random(m, r, 4, gen=gen, dtype=dtype), balanced_random(r, n, 6, gen=gen, dtype=dtype)
    return sparse_random(m, r, 0.25, dtype, gen=gen), sparse_random(r, n, 0.4, dtype, gen=gen)


def test_kernels_run_here(device):
    assert kernels_available(device)


@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 4), ("decode", 17), ("auto", 2),
                                         ("prefill", 33), ("prefill_overlap", 5), ("decode_bn1", 3), ("materialize", 9), ("torch", 3)])
@pytest.mark.parametrize("balanced", [True, False])
def test_factorized_paths(device, path, tokens, balanced):
    gen = torch.Generator().manual_seed(tokens + 100 * balanced)
    A, B = _dsf(gen, balanced=balanced)
    layout = "nibble" if balanced else "delta"  # tiny factors: "auto" would pick dense
    kA, kB = prepare_factor(A, layout=layout, device=device), prepare_factor(B, layout=layout, device=device)
    x = torch.randn(tokens, 40, generator=gen).half().to(device)
    bias = torch.randn(24, generator=gen).half().to(device)
    y = factorized_matmul(x, kA, kB, bias, path=path)
    ref = (x.double().cpu() @ B.double().t()) @ A.double().t() + bias.double().cpu()
    assert y.shape == (tokens, 24) and y.dtype == torch.float16
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_factorized_leading_dims_and_dtype(device, dtype):
    gen = torch.Generator().manual_seed(9)
    A, B = _dsf(gen, dtype=dtype)
    kA, kB = prepare_factor(A, layout="nibble", device=device), prepare_factor(B, layout="nibble", device=device)
    x = torch.randn(2, 3, 40, generator=gen).to(dtype).to(device)
    y = factorized_matmul(x, kA, kB)
    ref = (x.double().cpu() @ B.double().t()) @ A.double().t()
    assert y.shape == (2, 3, 24) and rel_err(y, ref) <= (1e-2 if dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 8), ("prefill", 20)])
@pytest.mark.parametrize("layout", ["nibble", "delta", "dense"])
def test_sparse_matmul(device, path, tokens, layout):
    gen = torch.Generator().manual_seed(tokens)
    w = balanced_random(37, 50, 8, gen=gen) if layout == "nibble" else sparse_random(37, 50, 0.5, gen=gen)
    kW = prepare_factor(w, layout=layout, device=device)
    x = torch.randn(tokens, 50, generator=gen).half().to(device)
    y = sparse_matmul(x, kW, path=path)
    assert rel_err(y, x.double().cpu() @ w.double().t()) <= 1e-2


def test_prepare_from_packed_formats(device):
    formats = pytest.importorskip("dsf_runtime.formats")
    gen = torch.Generator().manual_seed(1)
    w = sparse_random(30, 45, 0.3, gen=gen)
    for layout in ("csr", "bitmask"):
        packed = formats.pack(w, layout)
        k = prepare_factor(packed, device=device)
        assert torch.equal(k.to_dense().cpu(), w)


def test_choose_layout():
    gen = torch.Generator().manual_seed(2)
    assert choose_layout(balanced_random(32, 1024, 5, gen=gen)) == "nibble"
    assert choose_layout(sparse_random(32, 256, 0.3, gen=gen)) == "delta"
    assert choose_layout(sparse_random(32, 64, 0.95, gen=gen)) == "dense"


def test_zero_tokens_and_warmup(device):
    gen = torch.Generator().manual_seed(3)
    A, B = _dsf(gen)
    kA, kB = prepare_factor(A, layout="nibble", device=device), prepare_factor(B, layout="delta", device=device)
    assert factorized_matmul(torch.zeros(0, 40, dtype=torch.float16, device=device), kA, kB).shape == (0, 24)
    warmup(kA, kB, tokens=(1,))


def test_errors(device):
    gen = torch.Generator().manual_seed(4)
    A, B = _dsf(gen)
    kA, kB = prepare_factor(A, device=device), prepare_factor(B, device=device)
    with pytest.raises(ValueError, match="factors do not chain"):
        factorized_matmul(torch.zeros(1, 40, dtype=torch.float16, device=device), kB, kA)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 40\]"):
        factorized_matmul(torch.zeros(1, 41, dtype=torch.float16, device=device), kA, kB)
    with pytest.raises(TypeError, match="factor values are torch.float16 but x is torch.bfloat16"):
        factorized_matmul(torch.zeros(1, 40, dtype=torch.bfloat16, device=device), kA, kB)
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        factorized_matmul(torch.zeros(1, 40, dtype=torch.float16, device=device), kA, kB, path="fast")
    with pytest.raises(TypeError, match="cannot prepare a factor of type str"):
        prepare_factor("A")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="chunked, stream-overlapped prefill runs on CUDA only")
def test_prefill_chunks_on_cuda(monkeypatch):
    from dsf_runtime.kernels import configs

    monkeypatch.setattr(configs, "PREFILL_CHUNK_MIN_BYTES", 0)
    gen = torch.Generator().manual_seed(6)
    A, B = balanced_random(200, 130, 4, gen=gen), balanced_random(130, 300, 6, gen=gen)
    kA, kB = prepare_factor(A, layout="nibble", device="cuda"), prepare_factor(B, layout="nibble", device="cuda")
    x = torch.randn(70, 300, generator=gen).half().cuda()
    bias = torch.randn(200, generator=gen).half().cuda()
    from dsf_runtime.kernels.dispatch import _prefill

    y = _prefill(x, [kA, kB], bias, chunks=3)
    ref = (x.double().cpu() @ B.double().t()) @ A.double().t() + bias.double().cpu()
    assert rel_err(y, ref) <= 1e-2
