"""benchmarks/load_memory.py runs its code paths on the CPU (the GPU numbers come from the device script)."""

import json

from benchmarks import load_memory


def test_cpu_dry_run_loads_both_layouts(tmp_path):
    out = tmp_path / "load.json"
    assert load_memory.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["stored_layout"] for r in rows] == ["nibble", "bitmask"]
    assert [r["layouts"] for r in rows] == [["nibble"], ["bitmask"]]  # CPU: stored layouts stay as stored
    assert all(0 < r["largest_layer_bytes"] < r["model_bytes"] and "peak_bytes" not in r for r in rows)
