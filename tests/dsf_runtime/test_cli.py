"""`dsf inspect` and `dsf run` on a tiny compressed Llama that uses the packaged SmolLM2 tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from dsf_cli import commands_runtime
from dsf_runtime import save_compressed
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)
from tests.dsf_runtime.helpers import compress_randomly, tiny_llama, uncompressed


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep sub-command names with two commands registered
    commands_runtime.register(app)
    return app


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    from compress.assets import smollm2_dir

    base = tmp_path / "base"
    base.mkdir()
    model = tiny_llama(vocab_size=49152)
    model.config.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, base / name)
    layers = compress_randomly(model, "bitmask")
    return save_compressed(tmp_path / "out", tensors=uncompressed(model, layers), layers=layers, config_source=base,
                           info={"base_model": "tiny-llama"})


def test_inspect(app: typer.Typer, directory: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(directory)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output and "bitmask/bitmask" in result.output
    assert "total (14 layers)" in result.output and "tiny-llama" in result.output


def test_inspect_json_matches_the_files(app: typer.Typer, directory: Path) -> None:
    import json

    result = CliRunner().invoke(app, ["inspect", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["layers"]) == 14 and report["base_model"] == "tiny-llama"
    size = report["size"]
    stored = (directory / "model.safetensors").stat().st_size
    assert 0 < stored - size["total_bytes"] < 64 * 1024  # the file adds only its header
    assert size["linear_bytes"] == sum(r["bytes"] for r in report["layers"])
    assert size["linear_dense_fp16_bytes"] == sum(2 * r["shape"][0] * r["shape"][1] for r in report["layers"])
    assert size["ratio"] == size["total_bytes"] / size["dense_fp16_bytes"]


def test_dense_directory_is_named_as_dense(app: typer.Typer, tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "dense")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "dense")], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "a dense Hugging Face checkpoint (config.json and weights, no dsf_manifest.json)" in result.output


def test_inspect_reports_incomplete_directory(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "dsf_manifest.json: missing" in result.output


def test_run_generates(app: typer.Typer, directory: Path) -> None:
    args = ["run", "--model", str(directory), "--prompt", "Hello there", "--max-new-tokens", "3", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Hello there")


def test_run_cuda_graph_flag_and_eos_cut(app: typer.Typer, directory: Path) -> None:
    args = ["run", "--model", str(directory), "--prompt", "Hi", "--max-new-tokens", "2", "--no-cuda-graphs"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tokens = torch.tensor([5, 7, 2, 9])
    assert commands_runtime._until_eos(tokens, 2).tolist() == [5, 7]
    assert commands_runtime._until_eos(tokens, [9, 7]).tolist() == [5]
    assert commands_runtime._until_eos(tokens, None).tolist() == [5, 7, 2, 9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generation path needs a CUDA device")
def test_run_on_cuda_prints_timing(app: typer.Typer, directory: Path) -> None:
    args = ["run", "--model", str(directory), "--prompt", "Hi", "--max-new-tokens", "4", "--device", "cuda"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "tokens/s (CUDA graph)" in result.output
