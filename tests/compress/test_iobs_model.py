"""Model-level I-OBS on the real SmolLM2-135M truncated to 2 blocks (CPU, 4 × 64 calibration tokens, 2 rounds):
end to end, best round kept by held-out perplexity, output reloads, exact nnz; the target formula; the errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress.api import CompressConfig, ConfigError
from compress.data import load_evaluation
from compress.evaluate import perplexity
from compress import iobs_model
from compress.iobs_model import ROUNDS_FILE, IOBSModelConfig, _Pass, _write_targets, compress_iobs_model
from compress.solvers.base import nnz_budget
from tests.compress.test_pipeline import two_block_smollm2

ITERATE = IOBSModelConfig(rounds=2, step=0.5, heldout_seqlen=64, heldout_windows=2)
SETTINGS = {"method": "sparsegpt", "density": 0.5, "samples": 4, "seqlen": 64, "device": "cpu", "batch_size": 4,
            "save_dtype": "float32", "embedding": "keep"}  # the reloaded output is the kept round exactly


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-round run: (output directory, returned report, the model after the run, tokenizer)."""
    model, tokenizer = two_block_smollm2()
    out = tmp_path_factory.mktemp("iobs") / "out"
    report = compress_iobs_model(CompressConfig(**SETTINGS), out, ITERATE, progress=False, model=model,
                                 tokenizer=tokenizer)
    return out, report, model, tokenizer


def test_rounds_logged_and_best_kept(run) -> None:
    out, report, _, _ = run
    log = report["iobs_rounds"]
    assert json.loads((out / ROUNDS_FILE).read_text()) == log
    rounds = log["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["heldout_perplexity"] > 1 and record["seconds"] > 0
        assert record["calibration_loss"] > 0 and record["mean_relative_error"] > 0
    assert "step_relative" in rounds[1] and "step_relative" not in rounds[0]
    assert log["best_round"] == min(rounds, key=lambda r: r["heldout_perplexity"])["round"]
    assert log["heldout"] == {"text": "northanger-abbey", "seqlen": 64, "windows": 2}
    assert report["compression"]["method"] == "iobs-model" and report["compression"]["projection"] == "sparsegpt"


def test_output_reloads_as_the_best_round(run) -> None:
    """The reloaded directory is the kept round: its held-out perplexity is that round's, its nnz exact."""
    from dsf_runtime.loader import from_pretrained

    out, report, model, tokenizer = run
    reloaded = from_pretrained(out, kernels=False)
    heldout = load_evaluation(tokenizer, "northanger-abbey", 64, 2)
    best = report["iobs_rounds"]["best_round"]
    expected = report["iobs_rounds"]["rounds"][best - 1]["heldout_perplexity"]
    assert perplexity(reloaded, heldout, progress=False).perplexity == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, heldout, progress=False).perplexity == pytest.approx(expected, rel=1e-5)
    layers = report["layer_errors"]["layers"]
    assert len(layers) == 14
    for row in layers:
        assert row["nnz"] == nnz_budget(row["shape"], 0.5) and row["method"] == "iobs-model"
        weight = model.get_submodule(row["name"]).weight
        assert int(torch.count_nonzero(weight)) == row["nnz"]
    assert report["layer_errors"]["summary"]["total_nnz"] == sum(row["nnz"] for row in layers)


def test_resume_after_an_interrupted_round_gives_the_same_output(run, tmp_path, monkeypatch) -> None:
    """Interrupted at the start of round 2, the run resumes from its round-1 checkpoint and writes exactly the
    output of the uninterrupted run (same factors, same round log apart from timings)."""
    from safetensors.torch import load_file

    reference_out, reference, _, _ = run
    out = tmp_path / "out"
    passes = iobs_model._calibration_pass

    def interrupted(*args, grad, **kwargs):
        if grad:
            raise KeyboardInterrupt
        return passes(*args, grad=grad, **kwargs)

    monkeypatch.setattr(iobs_model, "_calibration_pass", interrupted)
    model, tokenizer = two_block_smollm2()
    with pytest.raises(KeyboardInterrupt):
        compress_iobs_model(CompressConfig(**SETTINGS), out, ITERATE, progress=False, model=model, tokenizer=tokenizer)
    assert not (out / ROUNDS_FILE).exists()
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        compress_iobs_model(CompressConfig(**SETTINGS), out, ITERATE, progress=False, model=model, tokenizer=tokenizer)

    monkeypatch.setattr(iobs_model, "_calibration_pass", passes)
    model, tokenizer = two_block_smollm2()
    report = compress_iobs_model(CompressConfig(**SETTINGS), out, ITERATE, resume=True, progress=False, model=model,
                                 tokenizer=tokenizer)
    untimed = [{k: v for k, v in r.items() if k != "seconds"} for r in report["iobs_rounds"]["rounds"]]
    expected = [{k: v for k, v in r.items() if k != "seconds"} for r in reference["iobs_rounds"]["rounds"]]
    assert untimed == expected and report["iobs_rounds"]["best_round"] == reference["iobs_rounds"]["best_round"]
    tensors, reference_tensors = load_file(out / "model.safetensors"), load_file(reference_out / "model.safetensors")
    assert tensors.keys() == reference_tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference_tensors[name]), name
    assert not (out / ".dsf-partial").exists()


def test_targets_are_newton_steps() -> None:
    """``W − η·G·(Ĥ + λI)⁻¹`` with ``Ĥ = H/(2·seqlen)`` and ``λ = percdamp·mean(diag Ĥ)``, shared H per group."""
    torch.manual_seed(0)
    linears = [nn.Linear(6, 4, bias=False), nn.Linear(6, 3, bias=False)]
    groups = [[("a", linears[0]), ("b", linears[1])]]
    x = torch.randn(50, 6)
    hessian = 2 * x.T @ x / 5  # (2/N)·Σ xxᵀ for N = 5 windows of seqlen 10
    gradients = {"a": torch.randn(4, 6), "b": torch.randn(3, 6)}
    before = {name: linear.weight.detach().clone() for name, linear in groups[0]}
    config = IOBSModelConfig(step=0.3)
    _write_targets(groups, _Pass(1.0, {"a": hessian, "b": hessian}, gradients), config, seqlen=10)
    per_token = x.T @ x / 50
    damped = per_token + 0.01 * per_token.diagonal().mean() * torch.eye(6)
    for name, linear in groups[0]:
        expected = before[name] - 0.3 * gradients[name] @ torch.linalg.inv(damped)
        torch.testing.assert_close(linear.weight.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rounds": 0}, "rounds: must be ≥ 1 (1 = the one-shot compression only), got 0"),
        ({"step": 0.0}, "step: must be a finite number > 0, got 0.0"),
        ({"heldout": "persuasion"},
         "heldout: 'persuasion' is the final evaluation text; choose another, e.g. 'northanger-abbey'"),
        ({"heldout_windows": -1}, "heldout_windows: must be ≥ 0 (0 = all), got -1"),
    ],
)
def test_option_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        IOBSModelConfig(**options)
    assert str(info.value) == message


def test_projection_and_heldout_errors(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        compress_iobs_model(CompressConfig(**{**SETTINGS, "method": "dsf"}), tmp_path / "x", ITERATE)
    assert str(info.value) == "method: model-level I-OBS projects with sparsegpt or iobs, got 'dsf'"
    with pytest.raises(ConfigError) as info:
        compress_iobs_model(CompressConfig(**SETTINGS), tmp_path / "x", IOBSModelConfig(heldout="emma"))
    assert str(info.value) == (
        "heldout: 'emma' is also the calibration text; choose another text for the round selection"
    )
    with pytest.raises(ConfigError) as info:
        compress_iobs_model(CompressConfig(**{**SETTINGS, "pipeline": "dense-inputs"}), tmp_path / "x", ITERATE)
    assert str(info.value) == ("pipeline: model-level I-OBS projects block by block on the compressed model's "
                               "activations; dense-inputs is for the one-shot methods")
    assert not (tmp_path / "x").exists()
