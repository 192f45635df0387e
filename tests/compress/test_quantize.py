"""Quantized values of sparse results (compress.quantize): formats, bytes, RTN, masked error feedback, DSF factors."""

from __future__ import annotations

import math

import pytest
import torch

from compress.quantize import (
    Fp8Values,
    Int4Values,
    Int8Values,
    QuantizedMatrix,
    ValueFormat,
    balance_factors,
    encode,
    quantize_dense,
    quantize_dsf,
    quantize_gptq,
    quantize_rtn,
    value_format,
)
from compress.solvers import make_config, solve
from compress.solvers.base import layer_error
from tests.compress.dsf_reference import synthetic_layer
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)

FORMATS = [Int8Values(), Fp8Values(), Int4Values(64), Int4Values(128), Int4Values(256)]
IDS = ["int8", "fp8", "int4g64", "int4g128", "int4g256"]
BLOCK0 = "model.layers.0."
REAL_LAYERS = ["self_attn.q_proj", "mlp.up_proj"]


def _random_sparse(rows: int = 12, cols: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] with magnitudes spanning 4 decades, a ~50% mask, one all-pruned and one all-zero-kept row."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, cols)[torch.randperm(cols, generator=g)]
    mask = torch.rand(rows, cols, generator=g) < 0.5
    mask[1] = False  # a row without kept values
    weight[2] = 0  # a row whose kept values are all zero
    return weight * mask, mask


def _codes_equal(a: QuantizedMatrix, b: QuantizedMatrix) -> bool:
    """Bit-equal stored codes and scales (fp8 compared as bytes)."""
    return torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)) and torch.equal(a.scales, b.scales)


def _step(format: ValueFormat, scaled: torch.Tensor) -> torch.Tensor:
    """Grid spacing around each ``w/scale`` (float64): 1 for integer codes, the e4m3 spacing of the binade for fp8."""
    if isinstance(format, Fp8Values):
        exponent = torch.floor(torch.log2(scaled.abs().clamp(min=2.0**-6)))
        return torch.exp2(exponent - 3)
    return torch.ones_like(scaled)


def _expected_bytes(format: ValueFormat, rows: int, cols: int, nnz: int) -> int:
    """docs/format.md "Quantized values": codes + fp16 scales."""
    if isinstance(format, Int4Values):
        return math.ceil(nnz / 2) + 2 * rows * math.ceil(cols / format.group_size)
    return nnz + 2 * rows


# ------------------------------------------------------------------------------------------- formats and bytes


@pytest.mark.parametrize("format", FORMATS, ids=IDS)
def test_round_trip_and_bytes(format: ValueFormat) -> None:
    weight, mask = _random_sparse()
    hessian = synthetic_layer(12, 300, seed=1)[1].float()
    for quantized in (quantize_rtn(weight, format, mask=mask), quantize_gptq(weight, hessian, format, mask=mask)):
        values = quantized.dequantize()
        assert not values[~mask].any()
        again = encode(format, values, mask, quantized.scales)  # the stored codes come back bit for bit
        assert _codes_equal(again, quantized)
        assert quantized.nbytes == _expected_bytes(format, *mask.shape, int(mask.sum()))
        assert quantized.nbytes == format.stored_bytes(mask)
        assert quantized.codes.dtype == format.code_dtype and quantized.scales.dtype == torch.float16
    rtn = quantize_rtn(weight, format, mask=mask)
    assert _codes_equal(quantize_rtn(rtn.dequantize(), format, mask=mask), rtn)  # RTN is idempotent
    assert bool(torch.isfinite(rtn.scales).all()) and bool((rtn.scales > 0).all())


@pytest.mark.parametrize("format", FORMATS, ids=IDS)
def test_rtn_within_half_a_step_float64(format: ValueFormat) -> None:
    weight, mask = _random_sparse(seed=3)
    quantized = quantize_rtn(weight, format, mask=mask)
    scale = quantized.value_scales().double()
    exact = weight[mask].double()
    scaled = exact / scale
    assert bool((scaled.abs() <= format.qmax).all())  # scales are rounded up: nothing clips
    error = (quantized.dequantize()[mask].double() - exact).abs()
    bound = 0.5 * _step(format, scaled) * scale
    assert bool((error <= bound * (1 + 1e-6)).all()), float((error / bound).max())


def test_int4_packing_layout() -> None:
    values = torch.tensor([[1.0, -1.0, 7.0, 0.0], [0.0, 0.0, 0.0, -7.0]])
    quantized = encode(Int4Values(64), values, values != 0, torch.ones(2, dtype=torch.float16))
    assert quantized.codes.tolist() == [0xF1, 0x97]  # low nibble first, one stream over the rows (no row padding)
    assert torch.equal(quantized.dequantize(), values)


def test_int4_groups_are_columns_whatever_the_mask() -> None:
    weight = torch.ones(2, 130)
    weight[:, 128:] = 0.5  # columns 128, 129: the last group at g=64
    weight[1, :64] = 0  # row 1 keeps nothing in its first group: that group's scale is 1.0
    quantized = quantize_rtn(weight, Int4Values(64))
    assert quantized.scales.shape == (6,)  # 2 rows x ceil(130/64) groups, row-major
    assert quantized.scales[3].item() == 1.0 and torch.equal(quantized.scales[4:], quantized.scales[1:3])
    first, second, last = quantized.scales[:3]
    assert first == second and last == first / 2  # 0.5/7 is (1/7)/2: the same fp16 mantissa
    below = torch.nextafter(first, torch.tensor(0.0, dtype=torch.float16))
    assert below.item() < 1 / 7 <= first.item()  # amax/qmax rounded up to the next fp16
    assert quantized.dequantize()[0, :128].unique().tolist() == [7 * first.item()]


@pytest.mark.parametrize("format", FORMATS, ids=IDS)
def test_all_zero_row_gets_scale_one(format: ValueFormat) -> None:
    weight = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, -0.5]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    quantized = quantize_rtn(weight, format, mask=mask)
    assert quantized.scales[0].item() == 1.0
    assert not quantized.dequantize()[0].any()


def test_value_format_by_name() -> None:
    assert value_format("int8") == Int8Values() and value_format("fp8") == Fp8Values()
    assert value_format("int4") == Int4Values(128) and value_format("int4", group_size=64) == Int4Values(64)


# ------------------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("through_pruned", [True, False])
@pytest.mark.parametrize("format", FORMATS, ids=IDS)
def test_error_feedback_keeps_pruned_weights_zero(format: ValueFormat, through_pruned: bool) -> None:
    weight, mask = _random_sparse(seed=5)
    hessian = synthetic_layer(12, 300, seed=2)[1].float()
    quantized = quantize_gptq(weight, hessian, format, mask=mask, through_pruned=through_pruned, blocksize=32)
    assert torch.equal(quantized.mask, mask)
    assert not quantized.dequantize()[~mask].any()


@pytest.mark.parametrize("format", [Int8Values(), Fp8Values()], ids=["int8", "fp8"])
def test_lazy_blocks_do_not_change_row_scaled_results(format: ValueFormat) -> None:
    weight, mask = _random_sparse(seed=6)
    hessian = synthetic_layer(12, 300, seed=3)[1]
    results = [quantize_gptq(weight.double(), hessian, format, mask=mask, blocksize=b) for b in (7, 128, 300)]
    assert _codes_equal(results[0], results[1]) and _codes_equal(results[1], results[2])


def test_dense_mask_makes_the_pruned_rule_irrelevant() -> None:
    weight, hessian = synthetic_layer(16, 200, seed=4)
    mask = torch.ones(16, 200, dtype=torch.bool)
    flowing = quantize_gptq(weight, hessian, Int4Values(64), mask=mask)
    masked = quantize_gptq(weight, hessian, Int4Values(64), mask=mask, through_pruned=False)
    assert _codes_equal(flowing, masked)
    assert _codes_equal(quantize_dense(weight, Int4Values(64), hessian=hessian), flowing)


# ------------------------------------------------------------------------------------------- errors


def test_bad_group_size_names_the_layer() -> None:
    with pytest.raises(ValueError) as info:
        value_format("int4", group_size=100, layer_name="model.layers.3.mlp.up_proj")
    assert str(info.value) == "layer 'model.layers.3.mlp.up_proj': int4 group size must be one of (64, 128, 256), got 100"
    with pytest.raises(ValueError, match=r"^int4 group size must be one of \(64, 128, 256\), got 32$"):
        Int4Values(32)
    with pytest.raises(ValueError, match=r"^layer 'q': int8 has one scale per row; group_size applies to int4"):
        value_format("int8", group_size=128, layer_name="q")
    with pytest.raises(ValueError, match=r"^layer 'q': unknown value format 'int2'; valid formats: int8, fp8, int4$"):
        value_format("int2", layer_name="q")


def test_unsupported_dtype_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"^layer 'k_proj': unsupported weight dtype torch.int32"):
        quantize_rtn(torch.ones(2, 3, dtype=torch.int32), Int8Values(), layer_name="k_proj")
    with pytest.raises(ValueError, match=r"^layer 'k_proj': unsupported weight dtype torch.float8_e4m3fn"):
        quantize_rtn(torch.ones(2, 3).to(torch.float8_e4m3fn), Fp8Values(), layer_name="k_proj")
    good = quantize_rtn(torch.ones(2, 3), Int8Values())
    with pytest.raises(ValueError, match=r"^layer 'k_proj': int8 codes must be torch.int8, got torch.float16$"):
        QuantizedMatrix(Int8Values(), good.mask, good.codes.half(), good.scales, "k_proj")
    with pytest.raises(ValueError, match=r"^layer 'k_proj': scales must be torch.float16, got torch.float32$"):
        QuantizedMatrix(Int8Values(), good.mask, good.codes, good.scales.float(), "k_proj")


@pytest.mark.parametrize("bad", [0.0, math.nan, math.inf, -1.0])
def test_bad_scale_names_the_layer(bad: float) -> None:
    good = quantize_rtn(torch.ones(2, 3), Int4Values(64))
    scales = good.scales.clone()
    scales[1] = bad
    with pytest.raises(ValueError) as info:
        QuantizedMatrix(Int4Values(64), good.mask, good.codes, scales, "o_proj")
    assert str(info.value) == (
        f"layer 'o_proj': scale 1 is {float(scales[1])!r}; every scale must be finite and > 0 (1 of 2 are not)"
    )


def test_scale_overflow_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"^layer 'lm': scale 0 is inf; every scale must be finite and > 0"):
        quantize_rtn(torch.full((1, 4), 1e6), Int4Values(64), layer_name="lm")


# ------------------------------------------------------------------------------------------- real SmolLM2 layers


@pytest.fixture(scope="module")
def real_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """q_proj [576, 576] and up_proj [1536, 576] of SmolLM2 block 0 with H from 8 × 128 tokens of Emma."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.assets import smollm2_dir
    from compress.data import load_calibration
    from compress.hessian import HessianAccumulator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:1]
    windows = load_calibration(AutoTokenizer.from_pretrained(smollm2_dir()), "emma", 8, 128, 0)
    modules = {name: model.get_submodule(BLOCK0 + name) for name in REAL_LAYERS}
    accumulators = {name: HessianAccumulator(m.in_features, "cpu") for name, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: accumulators[name].add_batch(args[0]))
        for name, m in modules.items()
    ]
    try:
        with torch.inference_mode():
            model(input_ids=windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        torch.set_num_threads(threads)
    return {name: (modules[name].weight.detach().clone(), accumulators[name].hessian.clone()) for name in REAL_LAYERS}


@pytest.mark.parametrize("layer", REAL_LAYERS)
def test_error_feedback_beats_rtn_on_pruned_real_layers(real_layers, layer: str) -> None:
    weight, hessian = real_layers[layer]
    pruned = solve(weight, hessian, make_config("magnitude", 0.5)).factors["W"]
    for format in (Int8Values(), Int4Values(128)):
        errors = {
            name: layer_error(pruned, quantized.dequantize(), hessian)[0]
            for name, quantized in {
                "rtn": quantize_rtn(pruned, format),
                "masked": quantize_gptq(pruned, hessian, format, through_pruned=False),
                "feedback": quantize_gptq(pruned, hessian, format),
            }.items()
        }
        # measured: see docs/quantized-values.md (feedback/RTN 0.2–0.5, masked/RTN 0.4–0.75)
        assert errors["feedback"] < errors["masked"] < errors["rtn"], (format.name, errors)
        assert errors["feedback"] < 0.7 * errors["rtn"], (format.name, errors)


def test_dense_gptq_beats_rtn_on_a_real_layer(real_layers) -> None:
    weight, hessian = real_layers["self_attn.q_proj"]
    for format in (Int8Values(), Int4Values(128)):
        rtn = layer_error(weight, quantize_dense(weight, format).dequantize(), hessian)[0]
        gptq = layer_error(weight, quantize_dense(weight, format, hessian=hessian).dequantize(), hessian)[0]
        assert gptq < 0.7 * rtn, (format.name, gptq, rtn)


def test_dsf_factors_error_feedback_beats_rtn(real_layers) -> None:
    weight, hessian = real_layers["self_attn.q_proj"]
    result = solve(weight, hessian, make_config("dsf", 0.5, iters=5))
    left, right = result.factors["A"], result.factors["B"]
    for format in (Int8Values(), Int4Values(128)):
        rtn = quantize_dsf(left, right, hessian, format, weight=weight, error_feedback=False)
        plain = quantize_dsf(left, right, hessian, format, weight=weight, refit_iters=0)
        refit = quantize_dsf(left, right, hessian, format, weight=weight)
        for quantized in (rtn, plain, refit):
            assert torch.equal(quantized.A.mask, left != 0) and torch.equal(quantized.B.mask, right != 0)
            product = quantized.weight()
            assert quantized.error == pytest.approx(layer_error(left @ right, product, hessian)[0], rel=1e-6)
            assert quantized.weight_error == pytest.approx(layer_error(weight, product, hessian)[0], rel=1e-6)
        assert plain.error < 0.5 * rtn.error, (format.name, plain.error, rtn.error)
        assert refit.weight_error < plain.weight_error < rtn.weight_error, format.name


# ------------------------------------------------------------------------------------ balancing and mixed formats


def test_balance_factors_keeps_the_product_and_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(40, 12, generator=gen) * torch.logspace(-3, 2, 12) * (torch.rand(40, 12, generator=gen) < 0.5)
    left[:, 5] = 0
    right = torch.randn(12, 30, generator=gen) * (torch.rand(12, 30, generator=gen) < 0.4)
    a, b = balance_factors(left, right)
    bound = 3 * 2.0**-24 * (left.double().abs() @ right.double().abs())  # two fp32 roundings per term
    assert bool(((a.double() @ b.double() - left.double() @ right.double()).abs() <= bound).all())
    assert torch.equal(a != 0, left != 0) and torch.equal(b != 0, right != 0)
    rms = a.double().pow(2).mean(0).sqrt()
    torch.testing.assert_close(rms[torch.arange(12) != 5], torch.ones(11, dtype=torch.float64))
    assert torch.equal(a[:, 5], left[:, 5]) and torch.equal(b[5], right[5])  # an all-zero column stays as it is


def test_dsf_quantization_does_not_depend_on_how_the_pair_is_scaled() -> None:
    """``quantize_dsf`` balances first, so moving a diagonal between the factors changes nothing."""
    left, right = _random_sparse(48, 32, seed=1)[0], _random_sparse(32, 64, seed=2)[0]
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    hessian = 2 * x.T @ x / x.shape[0]
    scale = torch.logspace(-2, 2, 32)
    for format in (Int8Values(), Int4Values(64)):
        plain = quantize_dsf(left, right, hessian, format)
        moved = quantize_dsf(left * scale, right / scale[:, None], hessian, format)
        assert moved.error == pytest.approx(plain.error, rel=1e-3), format.name


@pytest.mark.parametrize("small_side", ["A", "B", "tie"])
def test_small_format_goes_to_the_factor_with_fewer_values(small_side: str) -> None:
    gen = torch.Generator().manual_seed(4)
    left = torch.randn(24, 16, generator=gen)
    right = torch.randn(16, 20, generator=gen)
    keep_a = {"A": 64, "B": 300, "tie": 200}[small_side]
    keep_b = {"A": 250, "B": 60, "tie": 200}[small_side]
    left.view(-1)[torch.randperm(left.numel(), generator=gen)[keep_a:]] = 0
    right.view(-1)[torch.randperm(right.numel(), generator=gen)[keep_b:]] = 0
    x = torch.randn(128, 20, generator=gen)
    hessian = 2 * x.T @ x / x.shape[0]
    quantized = quantize_dsf(left, right, hessian, Int4Values(64), small_format=Int8Values())
    small = "A" if small_side == "A" else "B"  # B on a tie
    formats = {"A": quantized.A.format, "B": quantized.B.format}
    assert formats[small] == Int8Values()
    assert formats["B" if small == "A" else "A"] == Int4Values(64)


def test_small_factor_in_int8_beats_int4_on_real_layers(real_layers) -> None:
    for layer in REAL_LAYERS:
        weight, hessian = real_layers[layer]
        result = solve(weight, hessian, make_config("dsf", 0.5, iters=5))
        left, right = result.factors["A"], result.factors["B"]
        int4 = quantize_dsf(left, right, hessian, Int4Values(128), weight=weight)
        mixed = quantize_dsf(left, right, hessian, Int4Values(128), small_format=Int8Values(), weight=weight)
        # measured at blocks 5 and 20 with 40 iterations: 0.3–0.65× (docs/quantized-values.md)
        assert mixed.weight_error < 0.8 * int4.weight_error, (layer, mixed.weight_error, int4.weight_error)
