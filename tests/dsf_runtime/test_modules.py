"""Every layout's matmul and modules.linear against float64 products; FactorizedLinear, SparseLinear, replace_linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsf_runtime import CompressedLayer, FactorizedLinear, SparseLinear, linear, pack, pack_factors, replace_linear
from dsf_runtime.formats import LAYOUTS, _common
from tests.dsf_runtime.helpers import random_sparse, single_thread  # noqa: F401 (autouse fixture)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _opts(layout: str) -> dict:
    return {"block_size": 16} if layout == "bsr" else {}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matmul_matches_dense(layout: str, dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(_common, "CHUNK_BYTES", 4 * 50 * 16)  # several row chunks (BSR: aligned to blocks)
    weight = random_sparse(70, 50, 0.3).to(dtype)
    x = torch.randn(2, 3, 50).to(dtype)
    y = pack(weight, layout, **_opts(layout)).matmul(x)
    assert y.shape == (2, 3, 70) and y.dtype == dtype
    _close(y, x.double() @ weight.double().T, dtype)


def test_matmul_out_dtype_and_shape_error() -> None:
    packed = pack(random_sparse(8, 6, 0.5), "csr", dtype=torch.float16)
    assert packed.matmul(torch.randn(4, 6, dtype=torch.float16), torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="input has 5 features, the 8x6 weight expects 6"):
        packed.matmul(torch.randn(4, 5))


def test_linear_chains_mixed_layouts() -> None:
    A, B = random_sparse(30, 20, 0.4, seed=3), random_sparse(20, 44, 0.4, seed=4)
    x = torch.randn(6, 44)
    y = linear(x, [pack(A, "bitmask"), pack(B, "delta")], torch.ones(30))
    torch.testing.assert_close(y.double(), x.double() @ (A.double() @ B.double()).T + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_factorized_linear_matches_product(layout: str) -> None:
    A, B = random_sparse(40, 24, 0.4, seed=1), random_sparse(24, 56, 0.4, seed=2)
    bias = torch.randn(40)
    factors = pack_factors(A, B, layout, dtype=torch.float16, **_opts(layout))
    module = FactorizedLinear(factors["A"], factors["B"], bias.half())
    x = torch.randn(5, 56, dtype=torch.float16)
    expected = x.double() @ (A.half().double() @ B.half().double()).T + bias.half().double()
    _close(module(x), expected, torch.float16)
    names = {f"{k}.{p}" for k in "AB" for p in LAYOUTS[layout].parts} | {"bias"}
    assert set(module.state_dict()) == names


def test_modules_follow_dtype_and_device_moves() -> None:
    W = random_sparse(16, 12, 0.5)
    module = SparseLinear(pack(W, "bitmask")).to(torch.bfloat16)
    assert module.W.values.dtype == torch.bfloat16 and module.W.bitmask.dtype == torch.uint8
    x = torch.randn(3, 12)
    _close(module(x.bfloat16()), x.double() @ W.bfloat16().double().T, torch.bfloat16)
    assert "in_features=12, out_features=16" in repr(module) and "layout=bitmask, shape=[16, 12]" in repr(module)


def test_factorized_linear_rejects_unchained_factors() -> None:
    with pytest.raises(ValueError, match=r"factors do not chain: A is \[4, 3\], B is \[2, 5\]"):
        FactorizedLinear(pack(torch.ones(4, 3), "dense"), pack(torch.ones(2, 5), "dense"))


def test_replace_linear_swaps_modules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8, bias=False))
    layers = {
        "0": CompressedLayer.from_dense("dsf", {"A": random_sparse(20, 12, 0.5), "B": random_sparse(12, 12, 0.5)},
                                        method="random", bias=model[0].bias.detach(), layout="csr"),
        "2": CompressedLayer.from_dense("single", {"W": random_sparse(8, 20, 0.5)}, method="random", layout="bsr",
                                        block_size=16),
    }
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = torch.relu(x @ layers["0"].weight().T + layers["0"].bias) @ layers["2"].weight().T
    replace_linear(model, layers, dtype=torch.float32)
    assert isinstance(model[0], FactorizedLinear) and isinstance(model[2], SparseLinear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_replace_linear_errors() -> None:
    model = nn.Sequential(nn.Linear(12, 20))
    layer = CompressedLayer.from_dense("single", {"W": torch.ones(8, 12)}, method="m")
    with pytest.raises(ValueError, match=r"module '0' is Linear \[20, 12\], expected a Linear of shape \[8, 12\]"):
        replace_linear(model, {"0": layer})
    with pytest.raises(ValueError, match="the model has no module '1.x' to replace"):
        replace_linear(model, {"1.x": layer})


def test_packed_object_is_stable_until_buffers_change() -> None:
    module = SparseLinear(pack(random_sparse(8, 8, 0.5), "csr"))
    first = module.W.packed()
    assert module.W.packed() is first  # kernels cache per packed object
    module.to(torch.float16)
    second = module.W.packed()
    assert second is not first and second.values.dtype == torch.float16
