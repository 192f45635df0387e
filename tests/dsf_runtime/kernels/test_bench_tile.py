"""benchmarks/bench_tile.py on a tiny shape in the interpreter (code paths and row schema, not speed), its tuning
entries written into a tuning file, and ``configs.tile_config`` reading them back for ``tile_matmul``."""

import json

import pytest
import torch

from benchmarks import bench_tile
from dsf_runtime.kernels import configs, tuning


def test_dry_run_rows_and_tuning_entries(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the dry run is the CPU's")
    d = bench_tile.DRY_RUN
    out = tmp_path / "tile.json"
    res = bench_tile.run(d["shapes"], d["batches"], d["sweep"], d["densities"], d["tiles"], 1, 60.0,
                         log=lambda *_: None, out=out)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    rows = {r["batch"]: r for r in res["rows"]}
    assert set(rows) == {1, 17} and all(r["rel_err"] <= bench_tile.MAX_REL_ERR for r in rows.values())
    swept = rows[17]
    assert set(swept["tile_configs"]) == {f"16x64 BN16 SK{sk}" for sk in (1, 4)}  # configs.tile_candidates(17)
    entries = bench_tile.tuning_entries(res)
    assert {(e["rows"], e["per_row"], e["tokens"]) for e in entries} == {
        (r, c, 32) for r, c in swept["factor_shapes"]}
    assert all(e["config"] == {k: v for k, v in swept["tile_config"].items() if k != "tile"} for e in entries)
    path = tuning.write_tuning(tmp_path / "tuned.json", {"device": "Fake GPU", "matmul": entries, "unpack": []},
                               source="test")
    try:
        configs.use_tuning_file(path)
        rows_, cols = swept["factor_shapes"][0]
        for tokens in (17, 20, 1, 256):  # its bucket (32), and the nearest tuned bucket of the same matrix
            got = configs.tile_config(rows_, cols, (1, 1), tokens, device="Fake GPU")
            assert got == entries[0]["config"], tokens
        assert configs.tile_config(999, 999, (4, 2), 8, device="Fake GPU") == configs.tile_heuristic((4, 2), 8)
    finally:
        configs.use_tuning_file(None)


def test_tile_heuristic_fills_the_gpu():
    assert configs.tile_heuristic((256, 64), 1) == {"BN": 16, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2}
    assert configs.tile_heuristic((64, 172), 1)["SPLIT_K"] == 5  # 64 tile rows: 5 splits reach 2 × 132 programs
    assert configs.tile_heuristic((64, 16), 1)["SPLIT_K"] == 2  # but each split keeps >= 8 tile columns
    assert configs.tile_heuristic((256, 64), 256) == {"BN": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
    assert [configs.token_bucket(t) for t in (1, 2, 3, 16, 17, 256)] == [1, 2, 4, 16, 32, 256]


def test_bad_tile_entries_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    entry = {"layout": "tile", "rows": 8, "per_row": 8, "BN": 16, "config": {"BN": 16}}  # 'tokens' missing
    path.write_text(json.dumps({"format": configs.FORMAT, "version": configs.VERSION,
                                "devices": {"G": {"matmul": [entry]}}}))
    with pytest.raises(configs.TuningFileError, match=r"bad\.json: devices\['G'\]\.matmul\[0\]: 'tokens'"):
        configs.read_tuning(path)
    entry["tokens"] = 16
    path.write_text(json.dumps({"format": configs.FORMAT, "version": configs.VERSION,
                                "devices": {"G": {"matmul": [entry]}}}))
    with pytest.raises(configs.TuningFileError, match=r"'config' must be an object with \['BN', 'SPLIT_K'"):
        configs.read_tuning(path)
