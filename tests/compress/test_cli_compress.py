"""``dsf compress`` and ``dsf eval`` end to end through typer's CliRunner on the 2-block SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dsf_cli.main import app
from tests.compress.test_pipeline import two_block_smollm2

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = two_block_smollm2()
    directory = tmp_path_factory.mktemp("smollm2-2blocks")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_compress_then_eval(model_dir, tmp_path):
    import dsf_runtime

    out = tmp_path / "out"
    result = _invoke(
        "compress", "--model", model_dir, "--method", "dsf", "--sparsity", "0.5", "--iters", "1",
        "--finalize-iters", "1", "--samples", "4", "--seqlen", "64", "--device", "cpu", "--output", out,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 14 layers, 3,538,944 of 7,077,888 weights kept (density 0.5000)" in result.output
    manifest = json.loads((out / "dsf_manifest.json").read_text())
    assert manifest["compression"]["method"] == "dsf" and manifest["compression"]["density"] == 0.5
    assert manifest["compression"]["solver_options"] == {"finalize_iters": 1, "iters": 1}
    assert manifest["layers"]["model.layers.1.mlp.down_proj"]["kind"] == "dsf"

    reloaded = dsf_runtime.from_pretrained(out, device="cpu")
    with torch.inference_mode():
        assert torch.isfinite(reloaded(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

    report_json, report_md = tmp_path / "r" / "eval.json", tmp_path / "r" / "eval.md"
    result = _invoke(
        "eval", "--model", out, "--seqlen", "128", "--max-windows", "2", "--device", "cpu",
        "--report-json", report_json, "--report-md", report_md, "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "on persuasion (2 windows × 128 tokens, 254 predicted tokens)" in result.output
    assert "| name | method | shape | nnz | density | error | relative_error | seconds |" in result.output
    assert "| model.layers.0.self_attn.q_proj | dsf | 576×576 | 165888 | 0.5000 |" in result.output
    saved = json.loads(report_json.read_text())
    assert saved["windows"] == 2 and saved["tokens"] == 254 and saved["seqlen"] == 128
    assert len(saved["layer_errors"]["layers"]) == 14
    assert f"Perplexity {saved['perplexity']:.4f}" in report_md.read_text()

    dense = _invoke("eval", "--model", model_dir, "--seqlen", "128", "--max-windows", "2", "--device", "cpu",
                    "--no-progress")
    assert dense.exit_code == 0, dense.output
    assert "perplexity" in dense.output and "| name |" not in dense.output

    again = _invoke("compress", "--model", model_dir, "--method", "magnitude", "--samples", "4", "--seqlen", "64",
                    "--device", "cpu", "--output", out, "--no-progress")
    assert again.exit_code == 1
    assert "already holds a compressed model (dsf_manifest.json); pass --overwrite" in again.output


@pytest.mark.slow
def test_compress_iobs_layer_and_model_level(model_dir, tmp_path):
    import dsf_runtime

    common = ["--model", model_dir, "--samples", "2", "--seqlen", "32", "--device", "cpu", "--no-progress"]
    layer = _invoke("compress", *common, "--method", "iobs", "--iters", "2", "--output", tmp_path / "layer")
    assert layer.exit_code == 0, layer.output
    assert "14 layers, 3,538,944 of 7,077,888 weights kept (density 0.5000)" in layer.output
    manifest = json.loads((tmp_path / "layer" / "dsf_manifest.json").read_text())
    assert manifest["compression"]["method"] == "iobs" and manifest["compression"]["solver_options"] == {"iters": 2}

    model = _invoke("compress", *common, "--method", "sparsegpt", "--iobs-rounds", "2", "--iobs-step", "0.1",
                    "--output", tmp_path / "model")
    assert model.exit_code == 0, model.output
    assert "model-level I-OBS: kept round" in model.output and "3,538,944 of 7,077,888" in model.output
    rounds = json.loads((tmp_path / "model" / "iobs_rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2]
    reloaded = dsf_runtime.from_pretrained(tmp_path / "model", device="cpu")
    with torch.inference_mode():
        assert torch.isfinite(reloaded(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda", "--iobs-rounds", "2"], "error: --method: model-level I-OBS projects with sparsegpt or iobs, got 'wanda'"),
        (["--method", "iobs", "--iobs-rounds", "2", "--heldout", "persuasion"],
         "error: --heldout: 'persuasion' is the final evaluation text"),
        (["--density", "1.5"], "error: --density/--sparsity: density must be in (0, 1], got 1.5"),
        (["--sparsity", "1.0"], "error: --density/--sparsity: density must be in (0, 1], got 0.0"),
        (["--density", "0.5", "--sparsity", "0.5"], "error: pass either --density or --sparsity, not both"),
        (["--method", "magnitude", "--iters", "5"], "error: method options: unknown option(s) 'iters' for method"),
        (["--method", "sparsegpt", "--matmul", "3xtf32"],
         "error: method options: unknown option(s) 'matmul' for method 'sparsegpt'"),
        (["--model", "/no/such/model"], "error: model directory '/no/such/model' does not exist"),
    ],
)
def test_compress_errors(args, message, tmp_path):
    result = _invoke("compress", *args, "--output", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_every_flag_has_help():
    import typer.main

    commands = typer.main.get_command(app).commands
    for name in ("compress", "eval", "demo"):
        command = commands[name]
        assert command.help, name
        for param in command.params:
            assert getattr(param, "help", None), f"dsf {name} {param.name} has no help"


def test_method_choices_are_the_solvers():
    from compress.solvers import METHODS
    from dsf_cli.commands_compress import Method

    assert [m.value for m in Method] == list(METHODS)


def test_pipeline_choices_are_the_configs():
    from compress.api import PIPELINES
    from dsf_cli.commands_compress import Pipeline

    assert tuple(p.value for p in Pipeline) == PIPELINES


def test_matmul_choices_are_the_solvers():
    from compress.solvers.products import MATMUL_PRECISIONS
    from dsf_cli.commands_compress import Matmul

    assert tuple(m.value for m in Matmul) == MATMUL_PRECISIONS
    result = runner.invoke(app, ["compress", "--matmul", "tf32", "-o", "unused"])
    message = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "Invalid value for '--matmul'" in message and "'tf32' is not one of" in message
