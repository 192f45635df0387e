"""`dsf inspect` and `dsf run` on a tiny compressed Llama that uses the packaged SmolLM2 tokenizer: the sizes against
dense fp16 (table and --json), the timing rows, the dense baseline (the base model, or the factors multiplied out)
and a dense directory run densely."""

from __future__ import annotations

import json
import re
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
def dense(tmp_path: Path) -> Path:
    """A tiny dense Llama directory (SmolLM2's vocabulary and tokenizer)."""
    from compress.assets import smollm2_dir

    tiny_llama(vocab_size=49152).save_pretrained(tmp_path / "dense")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, tmp_path / "dense" / name)
    return tmp_path / "dense"


def _compressed(dense: Path, out: Path, base_model: str) -> Path:
    """``dense``'s model compressed at random (bitmask) into ``out``, recording ``base_model`` in the manifest."""
    model = tiny_llama(vocab_size=49152)
    layers = compress_randomly(model, "bitmask")
    return save_compressed(out, tensors=uncompressed(model, layers), layers=layers, config_source=dense,
                           info={"base_model": base_model})


@pytest.fixture
def directory(tmp_path: Path, dense: Path) -> Path:
    """A compressed directory whose base model ('tiny-llama') is not on this machine."""
    return _compressed(dense, tmp_path / "out", "tiny-llama")


@pytest.fixture
def from_dense(tmp_path: Path, dense: Path) -> Path:
    """A compressed directory whose manifest names ``dense`` as its base model."""
    return _compressed(dense, tmp_path / "from-dense", str(dense))


def _run(app: typer.Typer, *args: object):
    """``dsf run`` with ``args`` (wide terminal, so that no line wraps); checks it succeeded."""
    result = CliRunner().invoke(app, ["run", *map(str, args)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result


def test_inspect(app: typer.Typer, directory: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(directory)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output and "bitmask/bitmask" in result.output
    assert "total (14 layers)" in result.output and "tiny-llama" in result.output


def test_inspect_json_matches_the_files(app: typer.Typer, directory: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["layers"]) == 14 and report["base_model"] == "tiny-llama"
    for r in report["layers"]:
        assert {"name", "kind", "layouts", "shape", "inner_dim", "density", "bytes", "dense_fp16_bytes"} <= set(r)
        assert r["kind"] == "dsf" and r["layouts"] == "bitmask/bitmask" and 0 < r["density"] <= 0.6
        assert r["dense_fp16_bytes"] == 2 * r["shape"][0] * r["shape"][1]
        assert r["ratio"] == r["bytes"] / r["dense_fp16_bytes"] > 0  # fp32 values here: some above 1
    size = report["size"]
    stored = (directory / "model.safetensors").stat().st_size
    assert 0 < stored - size["total_bytes"] < 64 * 1024  # the file adds only its header
    assert size["linear_bytes"] == sum(r["bytes"] for r in report["layers"])
    assert size["total_bytes"] == size["linear_bytes"] + size["other_bytes"] and size["other_bytes"] > 0
    assert size["linear_dense_fp16_bytes"] == sum(r["dense_fp16_bytes"] for r in report["layers"])
    assert size["uncompressed_tensors"] == 6  # embeddings and 5 norms (lm_head tied)
    assert size["ratio"] == size["total_bytes"] / size["dense_fp16_bytes"]


def test_dense_directory_is_named_as_dense(app: typer.Typer, dense: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(dense)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {dense}: a dense Hugging Face checkpoint (config.json and weights, no "
                                    "dsf_manifest.json), not a compressed directory")
    assert result.stderr.count("\n") == 1


def test_inspect_reports_incomplete_directory(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "dsf_manifest.json: missing" in result.stderr


def test_run_generates_and_times_itself(app: typer.Typer, directory: Path) -> None:
    result = _run(app, "--model", directory, "--prompt", "Hello there", "--max-new-tokens", 3, "--dtype", "float32")
    assert result.output.startswith("Hello there")
    header = next(line for line in result.output.splitlines() if "decode tok/s" in line)
    assert all(c in header for c in ("weights MiB", "load s", "prefill ms", "peak RSS MiB", "added MiB"))
    row = next(line for line in result.output.splitlines() if "compressed float32" in line)
    weights, load_s, prefill_ms, tok_s, peak, added = (float(v) for v in row.split("│")[3:9])
    assert 0 < weights < 12.5 and load_s > 0 and prefill_ms > 0 and tok_s > 0 and peak > added > 0
    assert "compressed vs dense" not in result.output and "dense baseline" not in result.output


def test_run_dense_baseline_is_the_base_model(app: typer.Typer, from_dense: Path, dense: Path) -> None:
    result = _run(app, "--model", from_dense, "--prompt", "Hi", "--max-new-tokens", 3, "--dense-baseline")
    assert f"dense baseline: the base model {dense} (the manifest's base_model)" in result.output
    rows = [line for line in result.output.splitlines() if "compressed float" in line or "dense float32" in line]
    assert len(rows) == 2 and str(dense) in rows[1]
    ratios = re.search(r"compressed vs dense: ([\d.]+)x decode tokens/s, ([\d.]+)x weight bytes, ([\d.]+)x prefill "
                       r"time$", result.output, re.MULTILINE)
    assert ratios and float(ratios[1]) > 0 and 0.5 < float(ratios[2]) < 1 and float(ratios[3]) > 0


def test_run_dense_baseline_multiplies_out_when_the_base_model_is_away(app: typer.Typer, directory: Path) -> None:
    result = _run(app, "--model", directory, "--prompt", "Hi", "--max-new-tokens", 3, "--dense-baseline")
    assert (f"dense baseline: {directory}'s factors multiplied out in memory (its base model 'tiny-llama' is not a "
            "directory on this machine)") in result.output
    assert "dense (multiplied out) float32" in result.output and "compressed vs dense:" in result.output


def test_multiplied_out_model_is_the_compressed_one_dense(directory: Path) -> None:
    """The multiplied-out baseline generates the compressed model's tokens, from fp32 weights of dense size."""
    baseline = commands_runtime.Baseline(directory, True, "")
    ids = torch.tensor([[5, 900, 17, 4000]])
    ours, dense = commands_runtime.compare(directory, baseline, ids, 6, "cpu", torch.float32, False)
    assert torch.equal(ours["ids"], dense["ids"])
    assert dense["weight_bytes"] == commands_runtime._weight_bytes(tiny_llama(vocab_size=49152))  # fp32, as built
    assert dense["route"] == "multiplied out" and ours["weight_bytes"] < dense["weight_bytes"]


def test_base_model_with_other_shapes_is_not_the_baseline(tmp_path: Path, dense: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "small-vocab")  # vocabulary 128: not the model that was compressed
    compressed = _compressed(dense, tmp_path / "c", str(tmp_path / "small-vocab"))
    baseline = commands_runtime.resolve_baseline(compressed, None)
    assert baseline.multiply_out and baseline.source == compressed
    assert "has other shapes (a different or cut model)" in baseline.why
    assert commands_runtime.resolve_baseline(compressed, dense) == commands_runtime.Baseline(
        dense, False, f"dense baseline: {dense} (--baseline)")


def test_run_a_dense_directory_densely(app: typer.Typer, dense: Path, from_dense: Path) -> None:
    result = _run(app, "--model", dense, "--prompt", "Hi", "--max-new-tokens", 3)
    assert f"{dense}: a dense Hugging Face directory (no dsf_manifest.json): running it densely" in result.output
    assert "dense float32" in result.output and "compressed" not in result.output
    result = CliRunner().invoke(app, ["run", "--model", str(dense), "--prompt", "Hi", "--dense-baseline"])
    assert result.exit_code == 2 and result.stderr == (
        f"error: --dense-baseline: {dense} is already dense (no dsf_manifest.json); pass a compressed --model, or "
        "compare two directories with `dsf run --model COMPRESSED --baseline DENSE`\n")
    result = CliRunner().invoke(app, ["run", "--model", str(dense), "--prompt", "Hi", "--baseline", str(from_dense)])
    assert result.exit_code == 2 and f"error: --baseline {from_dense}: not a dense Hugging Face directory" in (
        result.stderr)


def test_manifest_name_is_the_checkpoints() -> None:
    from dsf_runtime.checkpoint import MANIFEST_NAME

    assert commands_runtime._MANIFEST == MANIFEST_NAME


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
