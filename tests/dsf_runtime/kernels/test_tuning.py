"""Tuning as data (``dsf_runtime.kernels.tuning`` writes, ``configs`` reads): the JSON round trip, lookups of tuned
keys vs. the heuristic, the nearest-BN fallback, errors naming the file, and the tuning loop with a fake timer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsf_runtime.formats import DeltaMatrix, DenseMatrix, NibbleMatrix
from dsf_runtime.kernels import configs, tuning
from tests.dsf_runtime.kernels.conftest import balanced_random, sparse_random

H100 = "NVIDIA H100 80GB HBM3"
FAKE = "Fake GPU 1"


@pytest.fixture(autouse=True)
def no_user_file(monkeypatch):
    """Every test starts from the shipped files only and leaves no user file behind."""
    monkeypatch.delenv(configs.TUNING_ENV, raising=False)
    configs.use_tuning_file(None)
    yield
    configs.use_tuning_file(None)


def _found(device: str = FAKE) -> dict:
    return {"device": device,
            "matmul": [{"layout": "nibble", "rows": 64, "per_row": 32, "BN": 1, "us": 3.0,
                        "config": {"BN": 1, "BLOCK_R": 16, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2}},
                       {"layout": "nibble", "rows": 64, "per_row": 32, "BN": 16, "us": 5.0,
                        "config": {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 128, "num_warps": 4, "num_stages": 3,
                                   "XF32": True}}],
            "unpack": [{"rows": 64, "per_row": 32, "us": 1.0, "config": {"block_r": 16, "block_g": 32,
                                                                          "num_warps": 8}}],
            "timings": []}


def test_shipped_h100_table_is_read() -> None:
    assert H100 in configs.tables()
    tuned = configs.lookup("nibble", 4096, 1024, 1, device=H100)
    assert tuned == {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True}
    assert configs.unpack_config(4096, 1024, device=H100) == {"block_r": 4, "block_g": 64, "num_warps": 8}


def test_unseen_shape_or_device_falls_back_to_heuristic() -> None:
    assert configs.lookup("nibble", 4096, 1024, 1, device="Some Other GPU") == configs.heuristic("nibble", 4096, 1024, 1)
    assert configs.lookup("nibble", 4096, 999, 1, device=H100) == configs.heuristic("nibble", 4096, 999, 1)
    assert configs.lookup("delta", 4096, 1024, 16, device=H100) == configs.heuristic("delta", 4096, 1024, 16)
    assert configs.unpack_config(4096, 999, device=H100) == configs.UNPACK_DEFAULT
    if not torch.cuda.is_available():  # no current CUDA device: no table
        assert configs.device_name() is None
        assert configs.lookup("nibble", 4096, 1024, 1) == configs.heuristic("nibble", 4096, 1024, 1)


def test_heuristic_is_read_at_call_time(monkeypatch) -> None:
    monkeypatch.setattr(configs, "heuristic", lambda op, rows, per_row, BN: {"BN": BN, "marker": True})
    assert configs.lookup("nibble", 4096, 999, 4, device=H100) == {"BN": 4, "marker": True}


def test_nearest_bn_fallback(tmp_path: Path) -> None:
    """A missing BN takes the tuned config of the nearest measured BN on its side of BN = 1, with BN replaced."""
    assert configs.lookup("nibble", 4096, 1024, 8, device=H100) == dict(
        configs.lookup("nibble", 4096, 1024, 16, device=H100), BN=8)
    configs.use_tuning_file(tuning.write_tuning(tmp_path / "t.json", dict(_found(), matmul=_found()["matmul"][:1])))
    assert configs.lookup("nibble", 64, 32, 1, device=FAKE)["BLOCK_R"] == 16
    assert configs.lookup("nibble", 64, 32, 4, device=FAKE) == configs.heuristic("nibble", 64, 32, 4)  # not BN = 1's


def test_round_trip_and_merge(tmp_path: Path, monkeypatch) -> None:
    path = tuning.write_tuning(tmp_path / "gpu.json", _found(), source="test")
    assert not [p for p in tmp_path.iterdir() if p != path]  # the temporary file was renamed
    monkeypatch.setenv(configs.TUNING_ENV, str(path))
    configs.use_tuning_file(None)
    assert configs.lookup("nibble", 64, 32, 16, device=FAKE) == _found()["matmul"][1]["config"]
    assert configs.lookup("nibble", 64, 32, 1, device=FAKE) == _found()["matmul"][0]["config"]
    assert configs.unpack_config(64, 32, device=FAKE) == {"block_r": 16, "block_g": 32, "num_warps": 8}
    assert configs.lookup("nibble", 4096, 1024, 1, device=H100)["PREFETCH"]  # the shipped table is still read

    faster = dict(_found()["matmul"][0], config=dict(_found()["matmul"][0]["config"], BLOCK_R=4))
    tuning.write_tuning(path, dict(_found("Fake GPU 2"), matmul=[faster], unpack=[]))
    tuning.write_tuning(path, dict(_found(), matmul=[faster], unpack=[]))
    doc = json.loads(path.read_text())
    assert sorted(doc["devices"]) == [FAKE, "Fake GPU 2"] and doc["devices"][FAKE]["source"] == "test"
    assert len(doc["devices"][FAKE]["matmul"]) == 2 and len(doc["devices"][FAKE]["unpack"]) == 1
    assert configs.lookup("nibble", 64, 32, 1, device=FAKE)["BLOCK_R"] == 4  # replaced, the cache dropped
    assert configs.read_tuning(path)[FAKE]["matmul"][("nibble", 64, 32, 16)]["XF32"] is True


@pytest.mark.parametrize("text,message", [
    ("{not json", "not a readable JSON tuning file"),
    ('{"format": "something else", "version": 1, "devices": {}}', "not a tuning file"),
    ('{"format": "dsf-kernel-tuning", "version": 1, "devices": []}', "'devices' must be an object"),
    ('{"format": "dsf-kernel-tuning", "version": 1, "devices": {"G": {"matmul": [{"layout": "nibble", "rows": 4,'
     ' "per_row": 8, "config": {}}]}}}', "devices['G'].matmul[0]: 'BN' must be a non-negative integer"),
    ('{"format": "dsf-kernel-tuning", "version": 1, "devices": {"G": {"unpack": [{"rows": 4, "per_row": 8,'
     ' "config": {"block_r": 4}}]}}}', "devices['G'].unpack[0]: 'config' must be an object with"),
])
def test_malformed_file_names_the_file(tmp_path: Path, monkeypatch, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(configs.TuningFileError, match=r"bad\.json: .*") as err:
        configs.use_tuning_file(path)
    assert str(path) in str(err.value) and message in str(err.value)
    monkeypatch.setenv(configs.TUNING_ENV, str(path))
    with pytest.raises(configs.TuningFileError, match="bad.json"):
        configs.lookup("nibble", 64, 32, 1, device=FAKE)
    with pytest.raises(configs.TuningFileError, match="bad.json"):
        tuning.write_tuning(path, _found())
    monkeypatch.setenv(configs.TUNING_ENV, str(tmp_path / "missing.json"))
    configs.tables.cache_clear()
    with pytest.raises(configs.TuningFileError, match="missing.json: tuning file not found"):
        configs.lookup("nibble", 64, 32, 1, device=FAKE)


def test_write_needs_a_device(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names no device"):
        tuning.write_tuning(tmp_path / "t.json", dict(_found(), device=None))


def test_tuning_loop_with_a_fake_timer(tmp_path: Path) -> None:
    """Every candidate of every factor and BN is timed once per key; the fastest wins; a failing candidate is
    recorded, never chosen. The timer runs each candidate's first function (the real kernels, interpreted on CPU)
    for one config per key only, to keep it fast."""
    g = torch.Generator().manual_seed(0)
    A = NibbleMatrix.from_dense(balanced_random(32, 32, 4, gen=g), per_group=4)
    B = NibbleMatrix.from_dense(balanced_random(32, 96, 8, gen=g), per_group=8)
    W = DeltaMatrix.from_dense(sparse_random(32, 48, 0.3, gen=g))
    ran: list[str] = []

    def fake_timer(fns) -> float:
        n = len(ran)
        ran.append("t")
        if n == 0:
            fns[0]()  # one real launch under the interpreter checks the arguments tune builds
        if n == 1:
            raise RuntimeError("does not compile")
        return 100.0 - n  # later candidates are faster: the last one of each key wins

    found = tuning.tune([[A, B], [W], [DenseMatrix.from_dense(torch.ones(4, 4))], [A, B]], bns=(1, 16),
                        timer=fake_timer, device=FAKE)
    assert A.slots != B.slots
    keys = [(e["layout"], e["rows"], e["per_row"], e["BN"]) for e in found["matmul"]]
    assert keys == [("nibble", 32, A.slots, 1), ("nibble", 32, A.slots, 16), ("nibble", 32, B.slots, 1),
                    ("nibble", 32, B.slots, 16), ("delta", 32, configs.slots_per_row(W), 1),
                    ("delta", 32, configs.slots_per_row(W), 16)]
    for e in found["matmul"]:
        assert e["config"] == configs.candidates(e["layout"], e["BN"])[-1]
    assert [(e["rows"], e["per_row"]) for e in found["unpack"]] == [(32, A.slots), (32, B.slots)]
    n_candidates = sum(len(configs.candidates(k[0], k[3])) for k in keys) + 2 * len(configs.unpack_candidates())
    assert len(ran) == len(found["timings"]) == n_candidates
    assert found["timings"][0]["us"] == 100.0 and "does not compile" in found["timings"][1]["error"]

    configs.use_tuning_file(tuning.write_tuning(tmp_path / "fake.json", found))
    assert configs.lookup("delta", 32, configs.slots_per_row(W), 16, device=FAKE) == configs.candidates("delta", 16)[-1]
