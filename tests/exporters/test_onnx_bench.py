"""benchmarks/onnx_ort.py on a 64×96 layer: the models it builds, one fresh measuring process per run (RSS,
timings, the folding probe), the rows and the table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import onnx_ort as bench

SESSION_KEYS = {"file_mb", "rss_before_mb", "rss_growth_mb", "rss_after_create_mb", "peak_rss_create_mb",
                "peak_rss_mb", "create_s", "median_ms", "p20_ms", "p80_ms", "calls", "warm", "loadavg"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bench.Model]:
    work = tmp_path_factory.mktemp("onnx-ort")
    models, facts = bench.build_layer(work, shape=(64, 96))
    assert facts["shape"] == [64, 96] and facts["dsf_inner_dim"] == 64
    assert abs(facts["single_nnz"] - 0.5 * 64 * 96) < 300 and abs(facts["dsf_nnz"] - 0.5 * 64 * 96) < 300
    return {m.name: m for m in models}


def _args() -> argparse.Namespace:
    return argparse.Namespace(tokens=[1, 3], threads=1, repeats=2, time_budget=1.0)


def test_builds_every_layer_variant(models: dict[str, bench.Model]) -> None:
    assert set(models) == {
        "dense-fp32", "dense-fp16", "dsf-csr-fp32-custom", "dsf-csr-fp32-standard",
        *(f"single-{layout}-{tag}-{lowering}" for layout in ("csr", "bitmask") for tag in ("fp32", "fp16")
          for lowering in ("custom", "standard")),
    }
    custom, standard = models["single-bitmask-fp16-custom"], models["single-bitmask-fp16-standard"]
    assert Path(standard.path).parent == Path(custom.path).parent
    assert not Path(standard.path + ".data").exists()  # the standard twin reads the custom model's data
    assert standard.file_mb >= custom.file_mb > 0
    assert [r["opt"] for r in bench._plan(custom, (1,))] == ["all"]
    assert [(r["opt"], r["probe"]) for r in bench._plan(standard, (1,))] == [("all", True), ("none", False)]


def test_standard_lowering_folds_in_a_fresh_process(models: dict[str, bench.Model], tmp_path: Path) -> None:
    """ONNX Runtime folds the DSF standard lowering to one dense MatMul, and the RSS fields are the measuring
    process's own: its peaks are below this (torch-loaded) process's RSS, which ``ru_maxrss`` would inherit."""
    model = models["dsf-csr-fp32-standard"]
    parent_rss_mb = bench._status_mb()["VmRSS"]
    rows = bench.measure(model, {"opt": "all", "mmap_threshold": None, "probe": True}, _args(), tmp_path)
    assert [r["tokens"] for r in rows] == [1, 3]
    for row in rows:
        assert SESSION_KEYS <= set(row), SESSION_KEYS - set(row)
        assert (row["model"], row["lowering"], row["opt"]) == ("dsf-csr-fp32-standard", "standard", "all")
        assert row["decode_nodes_in_file"] > 0 and row["decode_nodes"] == 0 and row["folded"] is True
        assert row["dense_matmuls"] == 1
        assert row["optimized_weights_mb"] == pytest.approx(96 * 64 * 4 / 2**20, abs=0.05)  # one fp32 Wᵀ
        assert 0 < row["median_ms"] and row["calls"] in (1, 2)
        # Exact, not noisy: VmHWM >= VmRSS within one /proc read, and the peak after the calls is a running maximum.
        assert row["peak_rss_mb"] >= row["peak_rss_create_mb"] >= row["rss_after_create_mb"] > 0
        assert row["peak_rss_mb"] < parent_rss_mb
    assert rows[1]["peak_rss_mb"] >= rows[0]["peak_rss_mb"]
    assert list(tmp_path.iterdir()) == []  # the probe's optimized model is removed


def test_custom_ops_and_disabled_optimization(models: dict[str, bench.Model], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    custom = bench.measure(models["single-csr-fp32-custom"], bench._plan(models["single-csr-fp32-custom"], (1,))[0],
                           _args(), tmp_path)
    unfolded = bench.measure(models["single-csr-fp32-standard"], {"opt": "none", "mmap_threshold": 131072,
                                                                  "probe": False}, _args(), tmp_path)
    assert "folded" not in custom[0] and "folded" not in unfolded[0]
    assert unfolded[0]["mmap_threshold"] == 131072 and unfolded[0]["opt"] == "none"
    bench.print_table(custom + unfolded)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["scope", "model", "opt", "mmap"] and len(lines) == 3
    assert lines[2].split()[:4] == ["layer", "single-csr-fp32-standard", "none", "yes"]
