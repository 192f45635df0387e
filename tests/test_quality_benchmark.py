"""Smoke test of benchmarks/quality_smollm2.py on the real SmolLM2 truncated to one block: the results file has the
promised format and a rerun skips finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import quality_smollm2


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path: Path) -> None:
    argv = [
        "--blocks", "1", "--samples", "2", "--seqlen", "32", "--max-windows", "1", "--eval-seqlen", "64",
        "--methods", "magnitude,dsf-g16", "--densities", "0.5", "--dsf-iters", "2",
        "--out-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu",
    ]
    assert quality_smollm2.main(argv) == 0
    results = json.loads((tmp_path / "results" / "quality-smollm2.json").read_text())
    assert {"model", "calibration", "eval_text", "seqlen", "dense_perplexity", "runs"} <= set(results)
    assert results["seqlen"] == 64 and results["dense_perplexity"] > 1
    runs = {run["method"]: run for run in results["runs"]}
    assert set(runs) == {"magnitude", "dsf-g16"}
    for run in runs.values():
        assert set(run) == {"method", "density", "perplexity", "total_nnz", "seconds", "device"}
        assert run["density"] == 0.5 and run["perplexity"] > 1 and run["seconds"] > 0
    linears = 576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3  # one SmolLM2 block
    assert runs["magnitude"]["total_nnz"] == sum(
        int(n * 0.5) for n in (576 * 576, 576 * 576, 192 * 576, 192 * 576, 1536 * 576, 1536 * 576, 1536 * 576)
    )
    assert runs["dsf-g16"]["total_nnz"] <= linears // 2  # balanced groups stay within the budget
    errors = json.loads((tmp_path / "results" / "layer-errors-smollm2.json").read_text())
    assert len(errors["layers"]) == 7
    assert all(set(row["relative_error"]) == {"magnitude", "dsf-g16"} for row in errors["layers"])
    assert quality_smollm2.main(argv) == 0  # everything is done: nothing runs again
    assert json.loads((tmp_path / "results" / "quality-smollm2.json").read_text())["runs"] == results["runs"]
