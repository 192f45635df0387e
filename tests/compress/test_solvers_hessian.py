"""HessianAccumulator: SparseGPT's running ``H = (2/N)·Σ xxᵀ``."""

from __future__ import annotations

import math

import pytest
import torch

from compress.hessian import HessianAccumulator


def _sparsegpt_add_batch(H: torch.Tensor, nsamples: int, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``IST-DASLab/sparsegpt`` ``SparseGPT.add_batch`` for a linear layer, verbatim."""
    if len(inp.shape) == 2:
        inp = inp.unsqueeze(0)
    tmp = inp.shape[0]
    if len(inp.shape) == 3:
        inp = inp.reshape((-1, inp.shape[-1]))
    inp = inp.t()
    H *= nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = math.sqrt(2 / nsamples) * inp.float()
    H += inp.matmul(inp.t())
    return H, nsamples


def test_matches_sparsegpt_update() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(t, 7, 12, generator=generator) for t in (3, 1, 5)]
    batches.append(torch.randn(9, 12, generator=generator))
    acc = HessianAccumulator(12, "cpu")
    H, n = torch.zeros(12, 12), 0
    for batch in batches:
        acc.add_batch(batch)
        H, n = _sparsegpt_add_batch(H, n, batch)
    assert acc.nsamples == n == 10
    torch.testing.assert_close(acc.hessian, H, rtol=1e-6, atol=1e-6)
    tokens = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    torch.testing.assert_close(acc.hessian.double(), 2 * tokens.T @ tokens / 10, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_input_accumulates_fp32(dtype: torch.dtype) -> None:
    x = torch.randn(2, 5, 8).to(dtype)
    acc = HessianAccumulator(8, "cpu")
    acc.add_batch(x)
    assert acc.hessian.dtype == torch.float32
    expected = 2 * x.reshape(-1, 8).double().T @ x.reshape(-1, 8).double() / 2
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_single_vector_counts_one_sample() -> None:
    acc = HessianAccumulator(3, "cpu")
    acc.add_batch(torch.tensor([1.0, 2.0, 0.0]))
    assert acc.nsamples == 1
    torch.testing.assert_close(acc.hessian, torch.tensor([[2.0, 4.0, 0.0], [4.0, 8.0, 0.0], [0.0, 0.0, 0.0]]))


def test_inference_mode_either_side() -> None:
    with torch.inference_mode():
        created_inside = HessianAccumulator(4, "cpu")
    created_inside.add_batch(torch.ones(1, 4))
    created_outside = HessianAccumulator(4, "cpu")
    with torch.inference_mode():
        created_outside.add_batch(torch.ones(1, 4))
    created_outside.add_batch(torch.ones(1, 4))
    assert created_outside.nsamples == 2
    torch.testing.assert_close(created_inside.hessian, created_outside.hessian)


def test_errors() -> None:
    acc = HessianAccumulator(4, "cpu")
    with pytest.raises(ValueError) as info:
        acc.add_batch(torch.ones(2, 5))
    assert str(info.value) == "input has shape (2, 5), expected [..., 4] (the layer's in_features)"
    with pytest.raises(ValueError, match=r"^layer inputs must be floating point, got torch.int64$"):
        acc.add_batch(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^in_features must be positive, got 0$"):
        HessianAccumulator(0, "cpu")
    acc.free()
    with pytest.raises(RuntimeError, match=r"^the Hessian was freed; read .hessian before calling free\(\)$"):
        acc.add_batch(torch.ones(1, 4))
