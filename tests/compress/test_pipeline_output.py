"""compress_model end to end on the 2-block SmolLM2: reloadable output, report, and resume after an interruption."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from compress.api import CompressConfig, compress_model
from compress.data import load_calibration
from compress.output import PARTIAL_DIR
from tests.compress.test_pipeline import two_block_smollm2


@pytest.fixture(scope="module")
def smol():
    return two_block_smollm2()


@pytest.mark.slow
def test_density_one_output_reloads_with_the_models_logits(smol, tmp_path):
    import dsf_runtime

    model, tokenizer = copy.deepcopy(smol[0]), smol[1]
    ids = load_calibration(tokenizer, "persuasion", 2, 32, 1)
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=False).logits
    config = CompressConfig(method="magnitude", density=1.0, samples=4, seqlen=64, device="cpu", batch_size=2,
                            layout="dense", save_dtype="float32", embedding="keep")  # exact: the fp32 weights as they are
    report = compress_model(config, tmp_path / "out", model=model, tokenizer=tokenizer, progress=False)

    reloaded = dsf_runtime.from_pretrained(tmp_path / "out", device="cpu")
    with torch.inference_mode():
        logits = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    assert not (tmp_path / "out" / PARTIAL_DIR).exists()
    saved = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    rows = saved["layer_errors"]["layers"]
    assert len(rows) == 14 and rows[0]["name"] == "model.layers.0.self_attn.q_proj"
    assert set(rows[0]) == {"name", "method", "shape", "nnz", "density", "error", "relative_error", "seconds"}
    assert rows[0]["shape"] == [576, 576] and rows[0]["nnz"] == 576 * 576 and rows[0]["relative_error"] == 0
    compression = json.loads((tmp_path / "out" / "dsf_manifest.json").read_text())["compression"]
    assert {k: compression[k] for k in ("method", "density", "calibration", "samples", "seqlen", "seed")} == {
        "method": "magnitude", "density": 1.0, "calibration": "emma", "samples": 4, "seqlen": 64, "seed": 0
    }


@pytest.mark.slow
def test_resume_after_an_interruption_gives_identical_factors(smol, tmp_path, monkeypatch):
    import compress.calibration as calibration

    model, tokenizer = smol
    # Wanda is fast; its masks depend on diag H and the stored errors on all of H, so any difference in the
    # activations that the replayed block 0 feeds to block 1 would show in the factors or the manifest's errors.
    config = CompressConfig(method="wanda", density=0.5, samples=4, seqlen=64, device="cpu", batch_size=2)
    compress_model(config, tmp_path / "full", model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)

    real, calls = calibration.solve_group, []

    def interrupted(weights, hessian, solver_config, **kwargs):
        calls.append(len(weights))
        if len(calls) == 6:  # block 1, second group (o_proj)
            raise RuntimeError("simulated interruption")
        return real(weights, hessian, solver_config, **kwargs)

    monkeypatch.setattr(calibration, "solve_group", interrupted)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        compress_model(config, part, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    assert not (part / "dsf_manifest.json").exists()
    assert sorted(p.name for p in (part / PARTIAL_DIR).iterdir()) == ["block-00000.safetensors", "state.json"]

    with pytest.raises(FileExistsError, match="holds an unfinished run .*pass --resume to continue it"):
        compress_model(config, part, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    other = CompressConfig(**{**config.__dict__, "density": 0.4})
    with pytest.raises(ValueError) as info:
        compress_model(other, part, resume=True, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    assert "it was started with different settings (density: 0.5 -> 0.4)" in str(info.value)
    assert "pass --overwrite to start over" in str(info.value)

    calls.clear()
    monkeypatch.setattr(calibration, "solve_group", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    compress_model(config, part, resume=True, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    assert len(calls) == 4  # block 0 was replayed from its stored factors, only block 1 was solved
    assert not (part / PARTIAL_DIR).exists()

    expected, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert sorted(resumed) == sorted(expected)
    assert "model.layers.1.mlp.down_proj.W.values" in resumed
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    layers = lambda d: json.loads((d / "dsf_manifest.json").read_text())["layers"]  # noqa: E731
    assert layers(part) == layers(tmp_path / "full")
