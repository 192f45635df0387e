"""Smoke test of benchmarks/iobs_smollm2.py on the real SmolLM2 truncated to one block: the I-OBS runs land in
the shared quality file and in the details file with their layer comparison against SparseGPT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import iobs_smollm2


@pytest.mark.slow
def test_iobs_benchmark_smoke(tmp_path: Path) -> None:
    argv = [
        "--blocks", "1", "--samples", "2", "--seqlen", "32", "--max-windows", "1", "--eval-seqlen", "64",
        "--methods", "sparsegpt,iobs,iobs-model", "--rounds", "2", "--iobs-iters", "2", "--heldout-windows", "1",
        "--heldout-seqlen", "64", "--out-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"),
        "--device", "cpu",
    ]
    assert iobs_smollm2.main(argv) == 0
    quality = json.loads((tmp_path / "results" / "quality-smollm2.json").read_text())
    runs = {run["method"]: run for run in quality["runs"]}
    assert set(runs) == {"iobs", "iobs-model"}
    budget = sum(int(n * 0.5) for n in (576 * 576, 576 * 576, 192 * 576, 192 * 576, 1536 * 576, 1536 * 576,
                                        1536 * 576))
    assert all(run["total_nnz"] == budget and run["perplexity"] > 1 for run in runs.values())
    details = json.loads((tmp_path / "results" / "iobs-smollm2.json").read_text())
    (entry,) = details["densities"]
    assert set(entry["methods"]) == {"sparsegpt", "iobs", "iobs-model"}
    assert len(entry["layers"]) == 7 and entry["summary"]["iobs"]["all_blocks"]["layers"] == 7
    rounds = entry["iobs_model_rounds"]
    assert [r["round"] for r in rounds["rounds"]] == [1, 2] and rounds["best_round"] in (1, 2)
    with pytest.raises(SystemExit, match="unknown obc"):
        iobs_smollm2.main([*argv[:-2], "--methods", "obc"])
    assert iobs_smollm2.main(argv) == 0  # the density is done: nothing runs again
    assert json.loads((tmp_path / "results" / "iobs-smollm2.json").read_text())["densities"] == details["densities"]
