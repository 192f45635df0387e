"""benchmarks/bench_e2e.py and `dsf bench e2e` in dry-run mode: a tiny Llama on the CPU (pure-torch path), dense
vs random balanced DSF in memory and through a compressed directory; checks the row schema, ratios, table, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks import bench_e2e as bench
from benchmarks.common import DRY_RUN_CAVEAT
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)

KEYS = {"model", "variant", "density", "nnz_density", "phase", "batch", "tokens", "decode_tok_s", "decode_step_ms",
        "prefill_ms", "peak_mem_bytes", "weight_bytes", "linear_bytes", "cuda_graphs", "speedup_vs_dense",
        "weight_ratio_vs_dense", "layouts"}


def test_dry_run_rows(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "e2e.json"
    res = bench.bench_e2e(out=out, densities=(0.5,), batches=(1, 2), dry_run=True, dense_compile=None,
                          log=lambda *_: None)
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(res["rows"]))
    assert {(r["model"], r["variant"], r["phase"], r["batch"]) for r in rows} == {
        (m, v, p, b) for m in ("tiny-llama", "tiny-loader") for v in ("dense", "dsf-0.5")
        for p, b in (("decode", 1), ("decode", 2), ("prefill", 1))}
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        if r["phase"] == "decode":
            assert r["decode_tok_s"] > 0 and r["new_tokens"] == 3 and len(r["sample_ids"]) == 8
        else:
            assert r["prefill_ms"] > 0 and r["tokens"] == 16
        if r["variant"] == "dense":
            assert r["speedup_vs_dense"] == 1.0 and r["weight_ratio_vs_dense"] == 1.0
        else:
            assert 0.4 < r["nnz_density"] <= 0.5 and r["weight_ratio_vs_dense"] < 1.0
            assert r["layouts"] == {"bitmask": 28}  # 14 layers × 2 factors; CPU: pure torch
    loaded = [r for r in rows if r["model"] == "tiny-loader" and r["variant"] == "dsf-0.5"]
    assert all(r["via"] == "from_pretrained" for r in loaded)
    assert {"device", "driver", "torch", "triton", "transformers", "date", "git_sha"} <= set(res["meta"])
    assert out.with_suffix(".md").read_text().startswith("# End-to-end benchmark")
    assert f"**{DRY_RUN_CAVEAT}**" in out.with_suffix(".md").read_text() and res["meta"]["dry_run"]

    from matplotlib.figure import Figure

    from benchmarks.plot import plot

    titles = []
    suptitle = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda fig, text, **kw: titles.append(text) or suptitle(fig, text, **kw))
    assert plot(out).stat().st_size > 10_000
    assert len(titles) == 1 and titles[0].startswith(DRY_RUN_CAVEAT)
    merged = bench.merge([out, out], tmp_path / "merged.json")
    assert len(merged["rows"]) == 2 * len(rows) and len(merged["meta"]["merged_from"]) == 2


def test_cli_dry_run(tmp_path: Path) -> None:
    app = _bench_app()
    out = tmp_path / "cli.json"
    result = CliRunner().invoke(app, ["bench", "e2e", "--cpu-dry-run", "--models", "llama2-7b", "--densities", "0.3",
                                      "--batches", "1", "--no-plot", "--dense-compile", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| tiny-llama | dsf-0.3 |" in result.output and out.is_file()
    assert result.output.count(DRY_RUN_CAVEAT) >= 2  # the log and the table
    result = CliRunner().invoke(app, ["bench", "e2e", "--batches", "1,x", "--dry-run", "--out", str(out)])
    assert result.exit_code != 0 and "expected comma-separated numbers" in result.output


def test_speedups_are_against_the_faster_dense_variant() -> None:
    def row(variant, phase, value):
        return {"model": "m", "variant": variant, "phase": phase, "batch": 1, "weight_bytes": 100 if "dense" in
                variant else 40, "decode_tok_s": value if phase == "decode" else None,
                "prefill_ms": value if phase == "prefill" else None}

    rows = [row("dense", "decode", 100.0), row("dense-compiled", "decode", 125.0), row("dsf-0.5", "decode", 150.0),
            row("dense", "prefill", 10.0), row("dense-compiled", "prefill", 12.0), row("dsf-0.5", "prefill", 20.0)]
    bench.add_ratios(rows)
    decode, prefill = rows[2], rows[5]
    assert decode["baseline_variant"] == "dense-compiled" and decode["speedup_vs_dense"] == 1.2
    assert decode["speedup_vs_dense_eager"] == 1.5 and decode["weight_ratio_vs_dense"] == 0.4
    assert prefill["baseline_variant"] == "dense" and prefill["speedup_vs_dense"] == 0.5  # eager prefill is faster
    assert rows[0]["speedup_vs_dense"] == 0.8 and rows[1]["speedup_vs_dense"] == 1.0


@pytest.mark.slow
def test_compiled_dense_generates_the_eager_tokens() -> None:
    """``greedy_generate``/``time_prefill`` through ``torch.compile`` (the stronger dense baseline): same tokens."""
    import torch

    from benchmarks.e2e_models import TINY_LLAMA, build_random_llama
    from dsf_runtime.generation import greedy_generate, time_prefill

    model = build_random_llama(TINY_LLAMA, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    eager = greedy_generate(model, ids, 4)
    compiled = greedy_generate(model, ids, 4, compile_mode="default")
    assert torch.equal(compiled.ids, eager.ids) and compiled.decode_steps == 3
    assert time_prefill(model, 8, runs=1, compile_mode="default")["ms"] > 0


def _bench_app() -> typer.Typer:
    """A typer app with the ``bench`` group only."""
    from dsf_cli import commands_bench

    app = typer.Typer()
    app.callback()(lambda: None)
    commands_bench.register(app)
    return app


def test_cli_layer_options_mirror_the_script(tmp_path: Path, monkeypatch) -> None:
    """`dsf bench layer --help` lists bench_layer.py's options with the script's defaults; the command passes them
    through (with the interpreter's environment for --cpu-dry-run); without benchmarks/ it says so."""
    from benchmarks import bench_layer
    from dsf_cli import commands_bench

    result = CliRunner().invoke(_bench_app(), ["bench", "layer", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Example" in result.output
    script = {a.dest: a.default for a in bench_layer.parser()._actions if a.dest != "help"}
    command = typer.main.get_command(_bench_app()).commands["bench"].commands["layer"]
    options = {p.name: p.default for p in command.params}
    for name, default in script.items():
        assert f"--{name.replace('_', '-')}" in result.output, name
        if name == "no_bf16":
            assert options["bf16"] is not default
        else:
            assert options[name] == default or str(options[name]) == str(default), name

    calls = []
    monkeypatch.setattr(commands_bench, "_run_script", lambda name, args, env=None: calls.append((name, args, env))
                        or 0)
    out = tmp_path / "l.json"
    result = CliRunner().invoke(_bench_app(), ["bench", "layer", "--cpu-dry-run", "--batches", "1, 17", "--out",
                                               str(out)])
    assert result.exit_code == 0, result.output
    name, args, env = calls[0]
    assert name == "bench_layer" and env == {"TRITON_INTERPRET": "1", "DSF_INTERPRET_KERNELS": "1"}
    parsed = bench_layer.parser().parse_args(args)
    assert parsed.cpu_dry_run and parsed.batches == "1,17" and parsed.out == out and not parsed.no_bf16

    monkeypatch.undo()
    monkeypatch.setattr(commands_bench, "ROOT", tmp_path)
    result = CliRunner().invoke(_bench_app(), ["bench", "layer", "--cpu-dry-run"])
    assert result.exit_code == 2 and "bench_layer.py not found" in result.output


def test_dry_run_tables_say_they_are_not_speed_measurements() -> None:
    from benchmarks import bench_layer

    meta = {"device": "CPU", "torch": "t", "triton": "t", "transformers": "t", "date": "d"}
    for markdown in (bench_layer.markdown, bench.markdown):
        assert DRY_RUN_CAVEAT in markdown({"meta": dict(meta, dry_run=True), "rows": []})
        assert DRY_RUN_CAVEAT not in markdown({"meta": dict(meta, dry_run=False), "rows": []})
    assert "NOT a speed measurement" in DRY_RUN_CAVEAT


def test_cli_bench_own_model_against_its_baseline(tmp_path: Path) -> None:
    """`dsf bench e2e --model DIR` on the CPU: the compressed directory and its base model (the manifest's), each
    batch, both rows printed and written."""
    import shutil

    from compress.assets import smollm2_dir
    from dsf_runtime import save_compressed
    from tests.dsf_runtime.helpers import compress_randomly, tiny_llama, uncompressed

    dense = tiny_llama(vocab_size=49152)
    dense.save_pretrained(tmp_path / "dense")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, tmp_path / "dense" / name)
    layers = compress_randomly(dense, "bitmask")
    save_compressed(tmp_path / "dsf", tensors=uncompressed(dense, layers), layers=layers,
                    config_source=tmp_path / "dense", info={"base_model": str(tmp_path / "dense")})
    out = tmp_path / "own.json"
    result = CliRunner().invoke(_bench_app(), ["bench", "e2e", "--model", str(tmp_path / "dsf"), "--batches", "1,2",
                                               "--new-tokens", "3", "--prompt-tokens", "4", "--device", "cpu",
                                               "--out", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["batch"], r["route"]) for r in rows] == [(1, "compressed"), (1, "dense"), (2, "compressed"),
                                                        (2, "dense")]
    assert all(r["tok_s"] > 0 and r["prefill_ms"] > 0 and r["memory"] > 0 for r in rows)
    assert rows[0]["weight_bytes"] < rows[1]["weight_bytes"]
    assert report["baseline"] == {"source": str(tmp_path / "dense"), "multiply_out": False,
                                  "why": f"dense baseline: the base model {tmp_path / 'dense'} (the manifest's "
                                         "base_model)"}
    assert result.output.count("compressed vs dense:") == 2 and result.output.count("decode tok/s") == 2
    assert DRY_RUN_CAVEAT not in result.output  # a real measurement
