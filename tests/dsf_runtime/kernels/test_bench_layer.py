"""benchmarks/bench_layer.py end to end on a tiny shape (CPU interpreter: checks code paths and the row schema)."""

import json

import pytest

bench = pytest.importorskip("benchmarks.bench_layer")

KEYS = {"shape", "kind", "density", "batch", "dtype", "dense_us", "ours_us", "csr_us", "semi24_us"}


def test_rows_schema(tmp_path):
    out = tmp_path / "layer.json"
    res = bench.bench_layer([(32, 48)], (1,), out=out, delta_batches=(), bf16=False, log=lambda *_: None)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and {(r["kind"], r["density"]) for r in rows} == {
        ("dsf", 0.5), ("dsf", 0.3), ("single", 0.5), ("single", 0.3)}
    for r in rows:
        assert KEYS <= set(r) and r["shape"] == [32, 48] and r["batch"] == 1 and r["dtype"] == "float16"
        assert isinstance(r["dense_us"], float) and isinstance(r["ours_us"], float)
        assert r["rel_err"] <= 1e-2
    assert {"device", "driver", "torch", "triton", "date", "git_sha"} <= set(res["meta"])
    assert out.with_suffix(".md").read_text().startswith("# Layer benchmark")
