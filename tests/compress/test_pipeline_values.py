"""``compress_model(values="int8"/"fp8"/"int4")`` on the 2-block SmolLM2: codes with their scales in the output, the
reloaded model equal to the quantized model in memory, the recorded errors those of the decoded values, resume
after an interruption bit-exact, and the settings that cannot store quantized values refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from compress.api import CompressConfig, ConfigError, compress_model
from compress.data import load_calibration
from compress.output import PARTIAL_DIR
from compress.quantize import QUANTIZE_VERSION, ValueQuantization, codes_of, quantize_result
from compress.solvers import make_config, solve_group
from tests.compress.test_pipeline import two_block_smollm2

SETTINGS = {"method": "dsf", "density": 0.5, "solver_options": {"iters": 2, "finalize_iters": 2}, "samples": 4,
            "seqlen": 64, "device": "cpu", "batch_size": 2, "embedding": "keep"}


@pytest.fixture(scope="module")
def smol():
    return two_block_smollm2()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "values", "dtype", "ratio"), [
    ("dsf", "int8", "int8", 0.45), ("sparsegpt", "fp8", "float8_e4m3fn", 0.45), ("dsf", "int4", "int4", 0.3)])
def test_quantized_output_reloads_as_the_quantized_model(smol, tmp_path, method, values, dtype, ratio):
    import dsf_runtime

    model, tokenizer = copy.deepcopy(smol[0]), smol[1]
    settings = {**SETTINGS, "method": method, "solver_options": SETTINGS["solver_options"] if method == "dsf" else {}}
    group = {"value_group_size": 64} if values == "int4" else {}
    config = CompressConfig(**settings, values=values, **group, save_dtype="float32")  # fp32 scales: exact decode
    report = compress_model(config, tmp_path / "out", model=model, tokenizer=tokenizer, progress=False)
    manifest = json.loads((tmp_path / "out" / "dsf_manifest.json").read_text())
    assert manifest["compression"]["values"] == values
    reported = {row["name"]: row for row in report["layer_errors"]["layers"]}
    for name, entry in manifest["layers"].items():
        for factor in entry["factors"].values():
            assert (factor["dtype"], factor["scale_dtype"]) == (dtype, "float32"), name
            assert factor.get("group_size") == group.get("value_group_size"), name
        assert entry["relative_error"] == reported[name]["relative_error"]
    with dsf_runtime.open_compressed(tmp_path / "out") as ckpt:
        assert ckpt.size_summary()["linear_ratio"] < ratio  # one byte per value (int4: half a byte) instead of two
        assert ckpt.load_layer("model.layers.1.mlp.down_proj").kind == ("dsf" if method == "dsf" else "single")
    _assert_reloads_as(model, tokenizer, tmp_path / "out")


def _assert_reloads_as(model, tokenizer, out) -> None:
    """The stored codes decode to exactly the in-memory model's weights (it holds the decoded product), and the
    reloaded directory gives its logits."""
    import dsf_runtime

    with dsf_runtime.open_compressed(out) as ckpt:
        layer = ckpt.load_layer("model.layers.1.mlp.down_proj")
    torch.testing.assert_close(layer.weight(), model.get_submodule("model.layers.1.mlp.down_proj").weight,
                               rtol=1e-6, atol=1e-7)
    ids = load_calibration(tokenizer, "persuasion", 2, 32, 1)
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits
        got = dsf_runtime.from_pretrained(out)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_small_factor_values_store_each_factor_in_its_own_format(smol, tmp_path):
    import dsf_runtime

    model, tokenizer = copy.deepcopy(smol[0]), smol[1]
    config = CompressConfig(**SETTINGS, values="int4", value_group_size=64, small_factor_values="int8",
                            save_dtype="float32")
    compress_model(config, tmp_path / "out", model=model, tokenizer=tokenizer, progress=False)
    manifest = json.loads((tmp_path / "out" / "dsf_manifest.json").read_text())
    assert manifest["compression"]["small_factor_values"] == "int8"
    for name, entry in manifest["layers"].items():
        factors = entry["factors"]
        small = min(("B", "A"), key=lambda k: factors[k]["nnz"])  # B on a tie, as quantize_dsf decides
        large = "A" if small == "B" else "B"
        assert (factors[small]["dtype"], factors[small].get("group_size")) == ("int8", None), name
        assert (factors[large]["dtype"], factors[large]["group_size"]) == ("int4", 64), name
    with dsf_runtime.open_compressed(tmp_path / "out") as ckpt:
        assert 0.2 < ckpt.size_summary()["linear_ratio"] < 0.3
    _assert_reloads_as(model, tokenizer, tmp_path / "out")


def test_stored_results_keep_each_factors_format(tmp_path):
    """Block files round-trip per-factor formats; a file of the one-format era is read as that format for both
    factors; a format map that does not name each factor is refused, naming the file and layer."""
    from compress.output import PartialRun
    from compress.solvers.base import SolveResult

    partial = PartialRun(tmp_path)
    partial.path.mkdir(parents=True)
    factors = {"A": torch.randn(4, 3), "B": torch.randn(3, 5)}
    scales = {"A": torch.ones(4, dtype=torch.float16), "B": torch.ones(3, 1, dtype=torch.float16)}
    result = SolveResult("dsf", factors, nnz=27, error=1.0, relative_error=0.1, seconds=0.5,
                         values={"A": "int8", "B": "int4"}, scales=scales, group_size=64)
    partial.save_results("r", {"layer": result})
    loaded = partial.load_results("r")["layer"]
    assert loaded.values == {"A": "int8", "B": "int4"} and loaded.group_size == 64
    assert all(torch.equal(loaded.factors[k], factors[k]) and torch.equal(loaded.scales[k], scales[k]) for k in "AB")
    for stored, expect in (("int8", {"A": "int8", "B": "int8"}), ({"A": "int8"}, None), ({"A": "int8", "B": "int2"},
                           None), ({"A": "int4", "B": "int8"}, "group")):
        metadata = {"layers": json.dumps({"layer": {"kind": "dsf", "nnz": 27, "error": 1.0, "relative_error": 0.1,
                                                    "seconds": 0.5, "values": stored, "group_size": None}})}
        tensors = {f"layer.{k}{suffix}": t for k in "AB" for suffix, t in (("", factors[k]), (".scales", scales[k]))}
        partial.save_tensors("old", tensors, metadata)
        if expect is None:
            with pytest.raises(ValueError, match=r"old\.safetensors.*layer 'layer' has value formats"):
                partial.load_results("old")
        elif expect == "group":  # an int4 factor without its group size
            with pytest.raises(ValueError, match=r"old\.safetensors.*layer 'layer' has group_size None"):
                partial.load_results("old")
        else:
            assert partial.load_results("old")["layer"].values == expect


def test_quantize_result_errors_and_codes_are_exact(smol):
    model = smol[0]
    linear = model.get_submodule("model.layers.0.mlp.down_proj")
    weight = linear.weight.detach().float()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, weight.shape[1], generator=gen)
    hessian = 2 * x.T @ x / x.shape[0]
    result = solve_group([weight], hessian, make_config("dsf", 0.5, iters=2, finalize_iters=2))[0]
    quantized = quantize_result(result, weight, hessian, "int8", "down_proj")
    assert quantized.values == {"A": "int8", "B": "int8"} and set(quantized.scales) == {"A", "B"}
    for key, factor in quantized.factors.items():
        codes = codes_of(factor, quantized.scales[key], "int8")
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
        assert torch.equal(codes.float() * quantized.scales[key].float()[:, None], factor)  # exact decode
        assert torch.equal(factor != 0, codes != 0)
        assert not bool(((result.factors[key] == 0) & (factor != 0)).any()), "the mask is kept"
    approx = (quantized.factors["A"].double() @ quantized.factors["B"].double()) - weight.double()
    assert quantized.error == pytest.approx(float(torch.sum((approx @ hessian.double()) * approx)), rel=1e-9)
    reference = float(torch.sum((weight.double() @ hessian.double()) * weight.double()))
    assert quantized.relative_error == pytest.approx(quantized.error / reference, rel=1e-9)
    # (the error may be below the fp32 solve's: quantize_dsf refits A against B̂ with 20 more finalize steps)
    with pytest.raises(ValueError, match="layer 'down_proj': unknown value format 'int2'"):
        quantize_result(result, weight, hessian, "int2", "down_proj")
    with pytest.raises(ValueError, match="layer 'down_proj': int8 has one scale per row; group_size applies"):
        quantize_result(result, weight, hessian, "int8", "down_proj", group_size=64)
    single = solve_group([weight], hessian, make_config("magnitude", 0.5))[0]
    with pytest.raises(ValueError, match="layer 'down_proj': small_factor_values applies to DSF factors"):
        quantize_result(single, weight, hessian, "int4", "down_proj", small_factor_values="int8")


def test_int4_result_codes_are_exact_and_rtn_is_worse(smol):
    """int4 codes with column-group scales decode exactly; error feedback beats round-to-nearest on a real layer."""
    model = smol[0]
    weight = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach().float()
    x = torch.randn(256, weight.shape[1], generator=torch.Generator().manual_seed(0))
    hessian = 2 * x.T @ x / x.shape[0]
    result = solve_group([weight], hessian, make_config("sparsegpt", 0.5))[0]
    gptq = ValueQuantization("int4", 64).apply(result, weight, hessian, "q_proj")
    rtn = ValueQuantization("int4", 64, error_feedback=False).apply(result, weight, hessian, "q_proj")
    assert gptq.error < rtn.error and gptq.group_size == 64
    scales = gptq.scales["W"]
    assert scales.shape == (weight.shape[0], weight.shape[1] // 64) and scales.dtype == torch.float16
    codes = codes_of(gptq.factors["W"], scales, "int4", 64)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7
    step = scales.double().repeat_interleave(64, dim=1)
    assert torch.equal(codes.double() * step, gptq.factors["W"].double())  # exact decode
    with pytest.raises(ValueError, match="int4 group size must be one of"):
        ValueQuantization("int4", 100)


@pytest.mark.slow
def test_resume_of_a_quantized_run_is_bit_exact(smol, tmp_path, monkeypatch):
    import compress.calibration as calibration

    model, tokenizer = smol
    config = CompressConfig(**{**SETTINGS, "method": "sparsegpt", "solver_options": {}}, values="int8")
    compress_model(config, tmp_path / "full", model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    real, calls = calibration.solve_group, []

    def interrupted(weights, hessian, solver_config, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # block 1, first group
            raise RuntimeError("simulated interruption")
        return real(weights, hessian, solver_config, **kwargs)

    monkeypatch.setattr(calibration, "solve_group", interrupted)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        compress_model(config, part, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    stored = load_file(part / PARTIAL_DIR / "block-00000.safetensors")
    assert "model.layers.0.mlp.down_proj.W.scales" in stored
    state = json.loads((part / PARTIAL_DIR / "state.json").read_text())
    assert state["config"]["quantize_version"] == QUANTIZE_VERSION  # a run quantized another way is not resumed
    with pytest.raises(ValueError, match=r"different settings \(values: 'int8' -> 'fp8'\)"):
        compress_model(CompressConfig(**{**config.__dict__, "values": "fp8"}), part, resume=True,
                       model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    monkeypatch.setattr(calibration, "solve_group", real)
    compress_model(config, part, resume=True, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    expected, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert sorted(resumed) == sorted(expected)
    for name in expected:
        assert torch.equal(resumed[name].view(torch.uint8), expected[name].view(torch.uint8)), name


def test_settings_without_a_stored_encoding_are_refused(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="value_group_size: applies to int4 values only, not 'int8'"):
        CompressConfig(values="int8", value_group_size=128)
    with pytest.raises(ConfigError, match="value_group_size: .*int4 group size must be one of"):
        CompressConfig(values="int4", value_group_size=100)
    with pytest.raises(ConfigError, match="small_factor_values: must be one of int8, fp8, int4, got 'int2'"):
        CompressConfig(values="int4", small_factor_values="int2")
    with pytest.raises(ConfigError, match="small_factor_values: applies to quantized values"):
        CompressConfig(small_factor_values="int8")
    with pytest.raises(ConfigError, match="small_factor_values: applies to DSF's two factors; sparsegpt stores one"):
        CompressConfig(method="sparsegpt", values="int4", small_factor_values="int8")
    CompressConfig(values="int8", small_factor_values="int4", value_group_size=64)  # the group size is the int4 one's
    with pytest.raises(ConfigError, match="rounding: must be one of gptq, rtn"):
        CompressConfig(values="int8", rounding="awq")
    with pytest.raises(ConfigError, match="rounding: applies to quantized values"):
        CompressConfig(rounding="rtn")
    with pytest.raises(ConfigError, match="layout: int8 codes are stored in auto or one of bitmask, csr, dense"):
        CompressConfig(values="int8", layout="nibble")
    from compress import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="int8 values are quantized in one process only; run without --nproc"):
        distributed.compress_model(CompressConfig(values="int8"), tmp_path / "x")
