"""Block-sequential compression across gloo ranks (``compress.distributed``) on SmolLM2 truncated to 2 blocks.

Each run is real processes (``multiprocessing`` spawn, env:// rendezvous on a free local port, one thread each);
the factors of every run are compared bit for bit with the run of one plain process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.distributed import (
    TIMEOUT_ENV,
    assign_owners,
    chunk_range,
    launched_world,
    maybe_relaunch,
    relaunch_command,
    solve_units,
)

# 4 windows in chunks of 1: 4 calibration chunks, 2 per rank; a short DSF; factors stored as fp32 dense matrices.
_CONFIG = {
    "method": "dsf", "density": 0.5, "solver_options": {"iters": 2, "finalize_iters": 2}, "samples": 4,
    "seqlen": 64, "device": "cpu", "batch_size": 1, "layout": "dense", "save_dtype": "float32",
}
_TIMEOUT_S = 20
_JOIN_S = 300


def _worker(rank: int, world: int, port: int, out: str, resume: bool, die_at_block: int | None, result: str) -> None:
    """One rank (or, with ``world`` 1, a plain process): compress the 2-block SmolLM2 into ``out`` and write the
    outcome to ``result``. With ``die_at_block``, the last rank exits abruptly when that block starts."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    os.environ[TIMEOUT_ENV] = str(_TIMEOUT_S)
    torch.set_num_threads(1)
    import compress.distributed as distributed
    from compress.api import CompressConfig, compress_model
    from tests.compress.test_pipeline import two_block_smollm2

    model, tokenizer = two_block_smollm2()
    if die_at_block is not None and rank == world - 1:
        real, blocks = distributed.collect_grams, []

        def dying(*args, **kwargs):
            blocks.append(None)
            if len(blocks) > die_at_block:
                os._exit(1)
            return real(*args, **kwargs)

        distributed.collect_grams = dying
    start = time.monotonic()
    try:
        compress_model(CompressConfig(**_CONFIG), out, resume=resume, model=model, tokenizer=tokenizer,
                       progress=False)
        outcome = {"ok": True}
    except Exception as exc:  # reported to the test
        outcome = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    outcome["seconds"] = time.monotonic() - start
    Path(result).write_text(json.dumps(outcome))


def _stalling_worker(rank: int, port: int, result: str) -> None:
    """Rank 1 of 2 joins and then never communicates; rank 0 writes the error of its first collective."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ[TIMEOUT_ENV] = "4"
    import compress.distributed as distributed

    ranks = distributed._start("cpu")
    if rank == 1:
        time.sleep(30)
        return
    start = time.monotonic()
    try:
        distributed._gather_counts(ranks, [[torch.zeros(2, 2)]], [1], "block 7")
        outcome = {"ok": True}
    except distributed.PeerFailure as exc:
        outcome = {"ok": False, "message": str(exc)}
    Path(result).write_text(json.dumps({**outcome, "seconds": time.monotonic() - start}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(world: int, out: Path, *, resume: bool = False, die_at_block: int | None = None) -> list[dict]:
    """Run ``world`` ranks to the end; each rank's outcome with its ``exitcode``."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    results = [out.parent / f"{out.name}-rank{rank}.json" for rank in range(world)]
    processes = [
        context.Process(target=_worker, args=(rank, world, port, str(out), resume, die_at_block, str(results[rank])))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(_JOIN_S)
    outcomes = []
    for process, result in zip(processes, results):
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError(f"a rank still ran after {_JOIN_S} s: it hangs")
        outcome = json.loads(result.read_text()) if result.exists() else {}
        outcomes.append({**outcome, "exitcode": process.exitcode})
    return outcomes


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _layer_errors(out: Path) -> list[dict]:
    rows = json.loads((out / "compression_report.json").read_text())["layer_errors"]["layers"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _assert_same_output(out: Path, reference: Path) -> None:
    """Every stored tensor (the fp32 factors included) and every layer error equal, bit for bit."""
    got, expected = _tensors(out), _tensors(reference)
    assert sorted(got) == sorted(expected)
    assert sum(name.endswith((".A", ".B")) or ".A." in name or ".B." in name for name in got) >= 28
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"tensors differ from the 1-process run: {different}"
    assert _layer_errors(out) == _layer_errors(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The output of one plain process (no torch.distributed)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    (outcome,) = _run(1, out)
    assert outcome["ok"], outcome
    return out


@pytest.mark.slow
def test_two_gloo_ranks_give_the_factors_of_one_process(reference, tmp_path):
    out = tmp_path / "out"
    outcomes = _run(2, out)
    assert all(o["ok"] and o["exitcode"] == 0 for o in outcomes), outcomes
    _assert_same_output(out, reference)


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_with_an_error_and_one_rank_resumes_identically(reference, tmp_path):
    out = tmp_path / "out"
    survivor, dead = _run(2, out, die_at_block=1)
    assert dead["exitcode"] == 1 and "ok" not in dead
    assert not survivor["ok"] and survivor["type"] == "PeerFailure", survivor
    assert survivor["message"].startswith("rank 0 of 2: gathering the Hessian partial counts of block 1 failed")
    assert "rank(s) 1 did not answer" in survivor["message"]
    assert survivor["seconds"] < _TIMEOUT_S + 15  # the error comes within the collective timeout (+ roll call)
    assert sorted(p.name for p in (out / ".dsf-partial").iterdir()) == ["block-00000.safetensors", "state.json"]

    (resumed,) = _run(1, out, resume=True)  # block 0 from the 2-rank run, block 1 in one process
    assert resumed["ok"], resumed
    _assert_same_output(out, reference)


def test_a_stalled_rank_gives_an_error_after_the_collective_timeout(tmp_path):
    context = multiprocessing.get_context("spawn")
    port, result = _free_port(), tmp_path / "rank0.json"
    processes = [context.Process(target=_stalling_worker, args=(rank, port, str(result))) for rank in range(2)]
    for process in processes:
        process.start()
    processes[0].join(60)
    processes[1].kill()
    processes[1].join()
    outcome = json.loads(result.read_text())
    assert not outcome["ok"]
    assert outcome["message"].startswith("rank 0 of 2: gathering the Hessian partial counts of block 7 failed after ")
    assert "(collective timeout 4 s, DSF_DIST_TIMEOUT): rank(s) 1 did not answer a roll call" in outcome["message"]
    assert 4 <= outcome["seconds"] < 4 + 1 + 10  # the timeout, the roll call (timeout / 4), slack for a busy machine


def test_chunks_are_split_contiguously_and_completely():
    for chunks in range(1, 9):
        for world in range(1, chunks + 1):
            ranges = [chunk_range(chunks, world, rank) for rank in range(world)]
            assert [c for r in ranges for c in r] == list(range(chunks))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_owners_are_bin_packed_largest_first_onto_the_least_loaded_rank():
    # LLaMA-2-70B units of one block: gate+up, down, q, o, k+v (cost out·in·min(out, in) per member)
    costs = [2 * 28672 * 8192**2, 28672 * 8192**2, 8192**3, 8192**3, 2 * 1024**2 * 8192]
    assert assign_owners(costs, 1) == [0] * 5
    assert assign_owners(costs, 2) == [0, 1, 1, 1, 1]
    assert assign_owners(costs, 8) == [0, 1, 2, 3, 4]
    assert assign_owners([1.0, 1.0, 1.0], 2) == [0, 1, 0]  # ties: earlier unit first, then the lower rank


def test_units_are_the_batches_dsf_solves_together():
    # One LLaMA-2-70B block on the meta device: k+v share a unit, gate and up (over 2^26 weights) are alone.
    def linear(out_features: int, in_features: int) -> torch.nn.Linear:
        return torch.nn.Linear(in_features, out_features, bias=False, device="meta")

    groups = [[("q", linear(8192, 8192)), ("k", linear(1024, 8192)), ("v", linear(1024, 8192))],
              [("o", linear(8192, 8192))], [("gate", linear(28672, 8192)), ("up", linear(28672, 8192))],
              [("down", linear(8192, 28672))]]
    units = solve_units(groups)
    assert [(unit.group, [name for name, _ in unit.members]) for unit in units] == [
        (0, ["q"]), (0, ["k", "v"]), (1, ["o"]), (2, ["gate"]), (2, ["up"]), (3, ["down"])]
    assert units[1].cost == 2 * 1024 * 8192 * 1024


def test_relaunch_runs_the_same_command_under_torchrun_without_nproc(monkeypatch):
    argv = ["-v", "compress", "--nproc", "2", "--method", "dsf", "--nproc=2", "-o", "runs/x"]
    command = relaunch_command(2, argv)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "dsf_cli.main", "-v", "compress", "--method", "dsf", "-o", "runs/x"]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world() is None and maybe_relaunch(1, argv) is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_world() == 2 and maybe_relaunch(2, argv) is None  # already a rank: run in place
    with pytest.raises(ValueError, match="nproc: 3 under torchrun with WORLD_SIZE=2"):
        maybe_relaunch(3, argv)
