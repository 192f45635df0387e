"""3×TF32 products (``compress.solvers.products``) against float64, and DSF solved with them."""

from __future__ import annotations

import pytest
import torch

from compress.solvers import DSFConfig, solve
from compress.solvers import products
from compress.solvers.products import Products, SplitTF32, round_tf32, split_tf32
from tests.compress.dsf_reference import synthetic_layer


def _spread(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 values over 20 binades, both signs."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 2.0 ** torch.randint(-10, 10, shape, generator=generator))


def test_round_tf32_rounds_to_nearest_with_ten_mantissa_bits():
    x = _spread((4096,), 0)
    rounded = round_tf32(x)
    assert not (rounded.view(torch.int32) & 0x1FFF).any()  # the 13 dropped mantissa bits are clear
    exact = x.double()
    _, exponent = torch.frexp(exact)  # |x| = m·2^e, m in [0.5, 1): 11 significant bits step 2^(e − 11)
    step = torch.ldexp(torch.ones_like(exact), exponent - 11)
    expected = exact.sign() * torch.floor(exact.abs() / step + 0.5) * step
    assert torch.equal(rounded.double(), expected)
    assert torch.equal(round_tf32(-x), -rounded)


def test_round_tf32_carries_into_the_exponent_and_refuses_other_dtypes():
    just_below_two = torch.tensor([2.0 - 2.0**-20], dtype=torch.float32)
    assert round_tf32(just_below_two).item() == 2.0
    with pytest.raises(TypeError, match="float32"):
        round_tf32(torch.ones(2, dtype=torch.float64))


def test_split_keeps_all_but_two_to_the_minus_22():
    x = _spread((4096,), 1)
    hi, lo = split_tf32(x)
    assert torch.equal(round_tf32(hi), hi) and torch.equal(round_tf32(lo), lo)
    residual = (x.double() - hi.double() - lo.double()).abs()
    assert bool((residual <= 2.0**-22 * x.double().abs()).all())


def _relative_error(product: torch.Tensor, exact: torch.Tensor) -> float:
    return ((product.double() - exact).norm() / exact.norm()).item()


def test_three_tf32_products_are_as_accurate_as_fp32_and_one_tf32_is_not():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(3, 64, 256, generator=generator)
    b = torch.randn(3, 256, 48, generator=generator)
    c = torch.randn(3, 64, 48, generator=generator)
    exact = a.double() @ b.double()
    fp32 = _relative_error(Products("fp32").matmul(a, b), exact)
    three = _relative_error(Products("3xtf32").matmul(a, b), exact)
    one = _relative_error(round_tf32(a) @ round_tf32(b), exact)  # what plain TF32 tensor cores compute
    assert three < 4 * fp32 and one > 100 * three
    split_a = Products("3xtf32").split(a)  # a split operand is reused as is
    assert torch.equal(Products("3xtf32").matmul(split_a, b), Products("3xtf32").matmul(a, b))
    summed = Products("3xtf32").baddbmm(c.clone(), split_a, b)
    assert _relative_error(summed, c.double() + exact) < 4 * fp32
    target = c.clone()
    assert Products("3xtf32").baddbmm(target, a, b, inplace=True) is target
    torch.testing.assert_close(target, summed, rtol=0, atol=0)


def test_fp32_products_are_torch_own():
    generator = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(2, 16, 16, generator=generator) for _ in range(3))
    assert torch.equal(Products("fp32").matmul(a, b), a @ b)
    assert torch.equal(Products("fp32").baddbmm(c, a, b), torch.baddbmm(c, a, b))


def test_dsf_with_3xtf32_tracks_float64_like_fp32_and_plain_tf32_does_not(monkeypatch):
    """Mask selection is discontinuous, so a rounding difference can flip a near-tie and move the solve to another,
    equally good, local solution (``test_float32_close_to_float64``), a few percent away. Which solves flip depends
    on the machine's BLAS. Without a flip, fp32 and 3×TF32 reproduce the float64 error to 2e-6; plain TF32 is never
    closer than 1e-3. Solves within 1e-4 of float64, of these 12: fp32 10, 3×TF32 7, plain TF32 0 (2-core AMD EPYC;
    3×TF32 9 within 1e-3 on a 2-core Xeon)."""

    def ratios(matmul: str) -> list[float]:
        out = []
        for shape in ((96, 64), (64, 160)):
            for seed in range(6):
                weight, hessian = synthetic_layer(*shape, seed=seed)
                exact = solve(weight, hessian, DSFConfig(density=0.5, iters=20)).error
                single = solve(weight.float(), hessian.float(), DSFConfig(density=0.5, iters=20, matmul=matmul))
                out.append(single.error / exact)
        return out

    def agreeing(values: list[float]) -> int:
        return sum(abs(r - 1) < 1e-4 for r in values)

    three = ratios("3xtf32")
    assert agreeing(three) >= 4 and max(abs(r - 1) for r in three) < 0.1
    monkeypatch.setattr(products, "split_tf32", lambda x: SplitTF32(round_tf32(x), torch.zeros_like(x)))
    assert agreeing(ratios("3xtf32")) == 0  # the tail dropped: plain TF32 products


def test_3xtf32_options_are_checked():
    with pytest.raises(ValueError, match="matmul must be one of fp32, 3xtf32"):
        DSFConfig(density=0.5, matmul="tf32")
    weight, hessian = synthetic_layer(16, 24, seed=5)  # float64
    with pytest.raises(ValueError, match="layer 'mlp.up': matmul='3xtf32' splits float32"):
        solve(weight, hessian, DSFConfig(density=0.5, iters=2, matmul="3xtf32"), layer_name="mlp.up")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: TF32 tensor cores")
def test_3xtf32_on_tensor_cores_is_as_accurate_as_fp32():
    generator = torch.Generator(device="cuda").manual_seed(6)
    a = torch.randn(2, 512, 1024, device="cuda", generator=generator)
    b = torch.randn(2, 1024, 512, device="cuda", generator=generator)
    exact = a.double() @ b.double()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = _relative_error(a @ b, exact)
        assert _relative_error(Products("3xtf32").matmul(a, b), exact) < 4 * fp32
        assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
