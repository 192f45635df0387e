"""benchmarks/bench_layer.py end to end on a tiny shape (CPU interpreter: checks code paths and the row schema), and
its ``--tune`` step writing a tuning file through ``dsf_runtime.kernels.tuning`` (fake timer)."""

import json

import pytest

from benchmarks import bench_layer as bench
from dsf_runtime.kernels import configs

KEYS = {"shape", "kind", "density", "batch", "dtype", "dense_us", "ours_us", "csr_us", "semi24_us", "paths_us",
        "auto_us", "path"}


def test_rows_schema(tmp_path):
    out = tmp_path / "layer.json"
    res = bench.bench_layer([(32, 48)], (1,), out=out, delta_batches=(), bf16=False, log=lambda *_: None)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and {(r["kind"], r["density"]) for r in rows} == {
        ("dsf", 0.5), ("dsf", 0.3), ("single", 0.5), ("single", 0.3)}
    for r in rows:
        assert KEYS <= set(r) and r["shape"] == [32, 48] and r["batch"] == 1 and r["dtype"] == "float16"
        assert isinstance(r["dense_us"], float) and isinstance(r["ours_us"], float)
        assert set(r["paths_us"]) == {"auto", "decode"} and r["ours_us"] == min(r["paths_us"].values())
        assert r["rel_err"] <= 1e-2
    assert {"device", "driver", "torch", "triton", "date", "git_sha", "tuning"} <= set(res["meta"])
    assert out.with_suffix(".md").read_text().startswith("# Layer benchmark")


def test_code_rows_match_their_decoded_reference(tmp_path):
    res = bench.bench_layer([(32, 256)], (1,), delta_batches=(), bf16=False, densities=(0.5,),
                            codes=("int8", "fp8", "int4"), log=lambda *_: None)
    rows = {r["dtype"]: r for r in res["rows"] if r["kind"] == "dsf"}
    assert set(rows) == {"float16", "int8", "fp8", "int4"}
    for name in ("int8", "fp8", "int4"):
        assert rows[name]["rel_err"] <= 1e-2, name  # against the decoded factors in float64
    assert rows["int4"]["bytes"] < rows["int8"]["bytes"] < rows["float16"]["bytes"]
    with pytest.raises(SystemExit, match="--codes: unknown format 'int2'"):
        bench._code_formats("int8,int2")


def test_paths_exist():
    from dsf_runtime.kernels.dispatch import PATHS

    for kind in ("dsf", "single"):
        for batch in bench.BATCHES:
            paths = bench._paths_for(kind, batch)
            assert paths[0] == "auto" and set(paths) <= set(PATHS)
    assert "materialize" in bench._paths_for("dsf", 2048) and "materialize" not in bench._paths_for("single", 2048)


def test_tune_writes_a_tuning_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_tune_cases", lambda shapes: [((32, 48), "single", 0.5, "nibble")])
    out = tmp_path / "tuned.json"
    try:
        found = bench.tune_all([(32, 48)], out, bns=(1,), timer=lambda fns: 1.0, device="Fake GPU",
                               log=lambda *_: None)
        W = bench._prepare(bench.make_case((32, 48), "single", 0.5, "nibble", bench.torch.float16, "cpu"), "nibble")[0]
        entry = {"layout": "nibble", "rows": 32, "per_row": W.slots, "BN": 1}
        assert configs.lookup("nibble", 32, W.slots, 1, device="Fake GPU") == configs.candidates("nibble", 1)[0]
        assert found["file"] == str(out) and [{k: e[k] for k in entry} for e in found["matmul"]] == [entry]
        doc = json.loads(out.read_text())
        assert doc["devices"]["Fake GPU"]["source"] == "benchmarks/bench_layer.py --tune"
    finally:
        configs.use_tuning_file(None)


def test_cpu_dry_run_uses_the_tiny_setting(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        return  # the dry run is the CPU's; on a GPU the flag changes nothing
    seen = {}
    monkeypatch.setattr(bench, "bench_layer", lambda shapes, batches, **kw: seen.update(shapes=shapes,
                                                                                        batches=batches, **kw) or {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--cpu-dry-run", "--out", str(tmp_path / "l.json")]) == 0
    assert seen["shapes"] == list(bench.DRY_RUN_SHAPES) and seen["batches"] == bench.DRY_RUN_BATCHES
    assert seen["max_seconds"] == bench.DRY_RUN_SECONDS and seen["repeats"] == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.main(["--cpu-dry-run", "--out", str(tmp_path / "l.json")]) == 2
