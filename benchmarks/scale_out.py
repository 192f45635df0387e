"""Does compressing across ranks (``compress.distributed``) pay, and what would LLaMA-2-70B DSF 0.5 take on 8×H100?

Measured: the whole packaged SmolLM2-135M at DSF 0.5 (``dsf compress`` defaults: Emma, 64 × 512 tokens, 40
iterations) on the CPU, once as 1 process × 2 threads and once as 2 ranks × 1 thread (``torch.distributed.run``, the
command ``dsf compress --nproc 2`` runs), each the wall time of the whole command (start-up, model load, calibration,
solves, writing the output). Both runs' layer errors are compared (equal when their factors are).

Modelled (``docs/scale-out.md``): the same 2-rank run predicted from the 1-process run's per-unit solve times, each
scaled by that unit's measured slowdown on 1 thread beside another rank (against 2 threads alone) and bin-packed onto
2 ranks, against the 2-rank run's own owner solve times (the sanity check of the cost model; both runs' per-unit
solve times are kept in the output); and LLaMA-2-70B on 8×H100 projected from
``benchmarks/results/solver-speed-h100.json``.

Full measurement (the lead runs it: about 11 + 9 minutes of both cores of an otherwise idle machine)::

    python benchmarks/scale_out.py

Smoke run (minutes; not a result)::

    python benchmarks/scale_out.py --samples 16 --seqlen 64 --iters 1 --out /tmp/scale-out-smoke.json

Only the projection, printed (seconds)::

    python benchmarks/scale_out.py --projection-only

The projection of an existing result, recomputed (after a change to the solver timings or the units)::

    python benchmarks/scale_out.py --update-projection

Output: ``benchmarks/results/scale-out.json``: ``{"measured": [{"ranks", "threads_per_rank", "seconds", "model"}],
"projection": {"model", "gpus", "hours", "assumptions", ...}, "sanity": {...}, "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_meta  # noqa: E402
from compress.architectures import ARCHITECTURES, ArchitectureSpec  # noqa: E402
from compress.distributed import assign_owners, relaunch_command  # noqa: E402
from compress.output import REPORT_FILE, write_json_atomic  # noqa: E402
from compress.solvers.dsf import solve_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SOLVER_SPEED = RESULTS / "solver-speed-h100.json"

# LLaMA-2-70B: hidden 8192, MLP 28672, 64 query and 8 key/value heads of 128, 80 blocks.
LLAMA2_70B = {"hidden": 8192, "mlp": 28672, "kv": 1024, "blocks": 80}
# Assumptions of the projection (docs/scale-out.md says why each).
ASSUMPTIONS = {
    "gpus": 8,
    "samples": 128, "seqlen": 2048, "batch_size": 8,  # the reference's calibration; 16 chunks, 2 per rank
    "dsf_iters": 40,
    "p2p_gb_per_s": 200.0,  # NCCL send/recv between two H100 SXM over NVLink 4 (450 GB/s peak one way)
    "broadcast_gb_per_s": 150.0,  # NCCL broadcast bus bandwidth, 8 H100
    "forward_tflops": 300.0,  # bf16 block forward, 16 windows × 2048 tokens per rank
    "host_to_gpu_gb_per_s": 20.0,  # a block's bf16 weights to the GPU and back over PCIe 5
    "model_load_s": 300.0,  # each rank reads the 138 GB bf16 checkpoint once (page cache shared)
    "weight_bytes": 2,  # bf16 model
}


# ------------------------------------------------------------------------------------------------ cost model


def fit_solve_time(solver_speed: dict) -> tuple[float, float]:
    """Least-squares ``seconds = a·k²q + b·k³`` (``k = min(out, in)``, ``q = max``; the ADMM products and the
    k×k inverses of one 40-iteration DSF solve) through the measured rows; returns ``(a, b)``."""
    rows = [(min(r["out"], r["in"]), max(r["out"], r["in"]), r["median_s"]) for r in solver_speed["rows"]]
    design = torch.tensor([[k * k * q, k**3] for k, q, _ in rows], dtype=torch.float64)
    seconds = torch.tensor([s for _, _, s in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(design, seconds.unsqueeze(1)).solution.squeeze(1).tolist()
    return a, b


def _solve_s(fit: tuple[float, float], out_features: int, in_features: int) -> float:
    k, q = min(out_features, in_features), max(out_features, in_features)
    return fit[0] * k * k * q + fit[1] * k**3


def _proxy_cost(members: int, out_features: int, in_features: int) -> float:
    """``compress.distributed.SolveUnit.cost``."""
    return float(members * out_features * in_features * min(out_features, in_features))


def _block_wall(units: list[tuple[int, int, int, float]], ranks: int) -> tuple[float, list[float]]:
    """Solve wall time of one block: units ``(members, out, in, seconds)`` owned as ``assign_owners`` owns them
    (by the proxy cost); returns ``(max rank load, loads)``."""
    owners = assign_owners([_proxy_cost(m, o, i) for m, o, i, _ in units], ranks)
    loads = [0.0] * ranks
    for (_, _, _, seconds), owner in zip(units, owners):
        loads[owner] += seconds
    return max(loads), loads


def project_llama70b(solver_speed: dict) -> dict[str, Any]:
    """Hours for LLaMA-2-70B DSF 0.5 on ``ASSUMPTIONS["gpus"]`` H100s, with the per-block terms and memory."""
    h, f, kv, blocks = LLAMA2_70B["hidden"], LLAMA2_70B["mlp"], LLAMA2_70B["kv"], LLAMA2_70B["blocks"]
    a = ASSUMPTIONS
    gpus, fit = a["gpus"], fit_solve_time(solver_speed)
    # input groups (q, k, v | o | gate, up | down) and their units, as compress.distributed.solve_units makes them
    groups = {"q,k,v": [("q", h, h), ("k", kv, h), ("v", kv, h)], "o": [("o", h, h)],
              "gate,up": [("gate", f, h), ("up", f, h)], "down": [("down", h, f)]}
    names, shapes, group_of = [], [], []  # per unit: name, (members, out, in), input group index
    for index, members in enumerate(groups.values()):
        for batch in solve_batches([(o, i) for _, o, i in members]):
            names.append("+".join(members[j][0] for j in batch))
            shapes.append((len(batch), *members[batch[0]][1:]))
            group_of.append(index)
    units = [(m, o, i, m * _solve_s(fit, o, i)) for m, o, i in shapes]
    block_solve_s, loads = _block_wall(units, gpus)
    one_gpu = sum(u[3] for u in units)
    chunks = a["samples"] // a["batch_size"]
    per_rank = chunks // gpus
    # Hessian partials: for each (input group, owner), the other ranks' chunks, in² fp32 each
    owners = assign_owners([_proxy_cost(m, o, i) for m, o, i, _ in units], gpus)
    inputs = [h, h, h, f]
    pairs = {(g, o) for g, o in zip(group_of, owners)}
    hessian_bytes = sum((chunks - per_rank) * inputs[g] ** 2 * 4 for g, _ in pairs)
    factor_bytes = sum(m * (o * min(o, i) + min(o, i) * i) * 4 for m, o, i in shapes)
    params = sum(m * o * i for m, o, i in shapes)
    tokens_per_rank = per_rank * a["batch_size"] * a["seqlen"]
    forward_s = 2 * (2 * params * tokens_per_rank) / (a["forward_tflops"] * 1e12)  # H pass + output pass
    move_s = 2 * params * a["weight_bytes"] / (a["host_to_gpu_gb_per_s"] * 1e9)
    comm_s = hessian_bytes / (a["p2p_gb_per_s"] * 1e9) + factor_bytes / (a["broadcast_gb_per_s"] * 1e9)
    block_s = block_solve_s + comm_s + forward_s + move_s
    total_s = a["model_load_s"] + blocks * block_s
    solve_peak_gb = max(m * _solve_memory_gb(solver_speed, o, i) for m, o, i in shapes)  # the largest unit
    return {
        "model": "LLaMA-2-70B (80 blocks, 8192/28672, GQA 8 kv heads), DSF density 0.5, 40 iterations",
        "gpus": gpus,
        "hours": total_s / 3600,
        "per_block_s": {"solve_wall": block_solve_s, "rank_loads": loads, "hessian_and_factor_comm": comm_s,
                        "forwards": forward_s, "weights_to_gpu": move_s, "total": block_s},
        "one_gpu_hours": (a["model_load_s"] + blocks * (one_gpu + forward_s * gpus + move_s)) / 3600,
        "unit_solve_s": {name: u[3] for name, u in zip(names, units)},
        "bytes_per_block_gb": {"hessian_partials": hessian_bytes / 1e9, "factors_broadcast": factor_bytes / 1e9},
        "memory_per_rank_gb": {
            "block_weights_bf16_plus_fp32_copy": params * (a["weight_bytes"] + 4) / 1e9,
            "activations_in_out": 2 * tokens_per_rank * h * a["weight_bytes"] / 1e9,
            "local_hessian_partials": per_rank * sum(n * n * 4 for n in (h, h, h, f)) / 1e9,
            "down_proj_hessian_owner_sum_plus_receive_buffer": 2 * f * f * 4 / 1e9,
            "largest_unit_solve": solve_peak_gb,
            "host_ram_model_copy_per_rank": params * blocks * a["weight_bytes"] / 1e9,
        },
        "assumptions": {**a, "solve_time_fit": {"a_s_per_k2q": fit[0], "b_s_per_k3": fit[1],
                                                "source": str(SOLVER_SPEED.relative_to(RESULTS.parents[1]))}},
    }


def _solve_memory_gb(solver_speed: dict, out_features: int, in_features: int) -> float:
    """Peak solve memory of one layer, scaled by ``out·in`` from the largest measured row."""
    row = max(solver_speed["rows"], key=lambda r: r["out"] * r["in"])
    return row["peak_memory_gb"] * out_features * in_features / (row["out"] * row["in"])


def _block_of(name: str) -> str:
    """The decoder block of a layer name: ``model.layers.3.mlp.up_proj`` -> ``model.layers.3``."""
    match = re.match(r"(.*?\.\d+)\.", name)
    if match is None:
        raise ValueError(f"{name!r} names no numbered decoder block")
    return match.group(1)


def block_units(report: dict, spec: ArchitectureSpec = ARCHITECTURES["llama"]
                ) -> dict[str, list[tuple[int, int, int, float]]]:
    """The solve units of each decoder block of a run (its ``compression_report.json``), as
    ``compress.distributed.solve_units`` makes them (``spec.groups`` split by ``solve_batches``):
    ``(members, out, in, seconds)``, ``seconds`` the unit's solve wall time (the sum of its members' shares)."""
    rows = {row["name"]: row for row in report["layer_errors"]["layers"]}
    per_block: dict[str, list[tuple[int, int, int, float]]] = {}
    for block in dict.fromkeys(_block_of(name) for name in rows):
        for paths in spec.groups:
            group = [rows[f"{block}.{path}"] for path in paths]
            for batch in solve_batches([tuple(row["shape"]) for row in group]):
                members = [group[i] for i in batch]
                per_block.setdefault(block, []).append(
                    (len(members), *members[0]["shape"], sum(row["seconds"] for row in members)))
    return per_block


def solve_wall(per_block: dict[str, list[tuple[int, int, int, float]]], ranks: int,
               thread_factors: dict[tuple[int, int, int], float] | None = None) -> float:
    """``Σ_blocks`` the largest rank's solve time, units owned as ``assign_owners`` owns them; each unit's time
    multiplied by its ``thread_factors`` entry when given."""
    total = 0.0
    for units in per_block.values():
        scaled = [(m, o, i, t * (thread_factors[(m, o, i)] if thread_factors else 1.0)) for m, o, i, t in units]
        total += _block_wall(scaled, ranks)[0]
    return total


def _unit_problem(members: int, out_features: int, in_features: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Synthetic weights and H of one unit (the same for every caller)."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(members)]
    x = torch.randn(4 * in_features, in_features, generator=generator)
    return weights, 2 * x.T @ x / x.shape[0]


def _timed_solve(unit: tuple[int, int, int], threads: int, iters: int, barrier=None) -> float:
    """Seconds of one DSF solve of ``unit`` on ``threads`` threads after a warm-up (and, given, the barrier)."""
    from compress.solvers import make_config, solve_group

    torch.set_num_threads(threads)
    weights, hessian = _unit_problem(*unit)
    config = make_config("dsf", 0.5, iters=iters)
    solve_group(weights, hessian, config)  # warm-up
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    solve_group(weights, hessian, config)
    return time.perf_counter() - start


def _rank_solve(unit: tuple[int, int, int], iters: int, barrier, seconds) -> None:
    seconds.put(_timed_solve(unit, 1, iters, barrier))


def measure_thread_factors(units: set[tuple[int, int, int]], iters: int = 5) -> dict[tuple[int, int, int], float]:
    """Per unit ``(members, out, in)`` (synthetic weights and H, ``iters`` DSF iterations): the solve time as a rank
    sees it, on 1 thread while a second process solves the same unit on the other core (they share caches and
    memory bandwidth), over the solve time on 2 threads alone, as one process sees it."""
    context = multiprocessing.get_context("spawn")
    factors = {}
    saved = torch.get_num_threads()
    try:
        for unit in sorted(units):
            two_threads = _timed_solve(unit, 2, iters)
            barrier, seconds = context.Barrier(2), context.Queue()
            workers = [context.Process(target=_rank_solve, args=(unit, iters, barrier, seconds)) for _ in range(2)]
            for worker in workers:
                worker.start()
            try:
                one_thread = max(seconds.get(timeout=600) for _ in workers)
            finally:
                for worker in workers:
                    worker.join(timeout=5)
                    if worker.is_alive():
                        worker.terminate()
            factors[unit] = one_thread / two_threads
    finally:
        torch.set_num_threads(saved)
    return factors


def sanity_check(report_one: dict, seconds_one: float, report_two: dict, seconds_two: float) -> dict[str, Any]:
    """The 2-rank run predicted from the 1-process run, against its measurement (``sanity``), with the thread
    factors measured now."""
    per_block_one, per_block_two = block_units(report_one), block_units(report_two)
    factors = measure_thread_factors({(m, o, i) for units in per_block_one.values() for m, o, i, _ in units})
    return sanity(per_block_one, seconds_one, per_block_two, seconds_two, factors)


def sanity(per_block_one: dict[str, list[tuple[int, int, int, float]]], seconds_one: float,
           per_block_two: dict[str, list[tuple[int, int, int, float]]], seconds_two: float,
           factors: dict[tuple[int, int, int], float]) -> dict[str, Any]:
    """Solves: each unit's 1-process (2-thread) time × its slowdown on 1 thread beside another rank (``factors``,
    ``measure_thread_factors``), bin-packed per block onto 2 ranks; measured: the 2-rank run's owner solve times,
    bin-packed the same way. The rest (start-up, model load, calibration forwards, writing) is predicted unchanged;
    its measured value is reported beside it."""
    solves_one = solve_wall(per_block_one, 1)
    predicted_solves = solve_wall(per_block_one, 2, factors)
    measured_solves = solve_wall(per_block_two, 2)
    predicted = seconds_one - solves_one + predicted_solves
    return {
        "thread_factors": {f"{m}x{o}x{i}": factor for (m, o, i), factor in factors.items()},
        "unit_seconds": {"one_process": per_block_one, "two_ranks": per_block_two},
        "solve_seconds_one_process": solves_one,
        "predicted_solve_wall_two_ranks": predicted_solves,
        "measured_solve_wall_two_ranks": measured_solves,
        "solve_model_error": predicted_solves / measured_solves - 1,
        "rest_seconds_one_process": seconds_one - solves_one,
        "rest_seconds_two_ranks": seconds_two - measured_solves,
        "predicted_seconds": predicted,
        "measured_seconds": seconds_two,
        "model_error": predicted / seconds_two - 1,
    }


def resanity(result: dict) -> dict[str, Any]:
    """``sanity`` recomputed from a result's stored unit times, thread factors and measured wall times."""
    old = result["sanity"]
    factors = {tuple(int(v) for v in key.split("x")): factor for key, factor in old["thread_factors"].items()}
    seconds = {(m["ranks"], m["threads_per_rank"]): m["seconds"] for m in result["measured"]}
    units = {run: {block: [tuple(unit) for unit in listed] for block, listed in per_block.items()}
             for run, per_block in old["unit_seconds"].items()}
    return sanity(units["one_process"], seconds[(1, 2)], units["two_ranks"], seconds[(2, 1)], factors)


# ------------------------------------------------------------------------------------------------ measurement


def _compress_args(args: argparse.Namespace, out: Path) -> list[str]:
    return ["compress", "--method", "dsf", "--density", "0.5", "--device", "cpu", "--samples", str(args.samples),
            "--seqlen", str(args.seqlen), "--iters", str(args.iters), "--no-progress", "--overwrite", "-o", str(out)]


def _timed(command: list[str], threads: int) -> float:
    """Wall seconds of ``command`` run with ``OMP_NUM_THREADS=threads``; raises when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=RESULTS.parents[1])
    return time.perf_counter() - start


def _max_relative_error_difference(a: dict, b: dict) -> float:
    rows_a = {r["name"]: r["relative_error"] for r in a["layer_errors"]["layers"]}
    rows_b = {r["name"]: r["relative_error"] for r in b["layer_errors"]["layers"]}
    return max(abs(rows_a[n] - rows_b[n]) / max(abs(rows_a[n]), 1e-30) for n in rows_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale-out.json")
    parser.add_argument("--projection-only", action="store_true", help="Print the 70B projection and exit.")
    parser.add_argument("--update-projection", action="store_true",
                        help="Recompute only the projection in the existing --out file (no measurement).")
    parser.add_argument("--update-sanity", action="store_true",
                        help="Recompute the sanity check of the existing --out file from its stored unit times and "
                        "thread factors (no measurement).")
    args = parser.parse_args()
    projection = project_llama70b(json.loads(SOLVER_SPEED.read_text()))
    if args.projection_only:
        print(json.dumps(projection, indent=1))
        return
    if args.update_sanity:
        stored = json.loads(args.out.read_text())
        checked = resanity(stored)
        write_json_atomic(args.out, {**stored, "sanity": checked})
        print(json.dumps({k: v for k, v in checked.items() if k != "unit_seconds"}, indent=1))
        print(f"updated {args.out}")
        return
    if args.update_projection:
        write_json_atomic(args.out, {**json.loads(args.out.read_text()), "projection": projection})
        print(f"projection: {projection['hours']:.2f} h on {projection['gpus']} GPUs; updated {args.out}")
        return
    with tempfile.TemporaryDirectory(prefix="scale-out-") as work:
        one, two = Path(work) / "one", Path(work) / "two"
        seconds_one = _timed([sys.executable, "-m", "dsf_cli.main", *_compress_args(args, one)], threads=2)
        seconds_two = _timed(relaunch_command(2, _compress_args(args, two)), threads=1)
        report_one = json.loads((one / REPORT_FILE).read_text())
        report_two = json.loads((two / REPORT_FILE).read_text())
    model = f"SmolLM2-135M DSF 0.5 (Emma {args.samples}×{args.seqlen}, {args.iters} iterations), CPU"
    sanity = sanity_check(report_one, seconds_one, report_two, seconds_two)
    difference = _max_relative_error_difference(report_one, report_two)
    result = {
        "measured": [
            {"ranks": 1, "threads_per_rank": 2, "seconds": seconds_one, "model": model},
            {"ranks": 2, "threads_per_rank": 1, "seconds": seconds_two, "model": model},
        ],
        "speedup_two_ranks": seconds_one / seconds_two,
        "layer_errors_max_relative_difference": difference,
        "sanity": sanity,
        "projection": projection,
        "meta": {**run_meta("cpu"), "cpus": os.cpu_count()},
        "note": ("wall time of the whole `dsf compress` command; 2 ranks = `dsf compress --nproc 2` "
                 "(torch.distributed.run, gloo, OMP_NUM_THREADS=1 per rank); layer errors compared because "
                 "the factors are bit-identical only for the same threads per process"),
    }
    write_json_atomic(args.out, result)
    sanity_summary = {k: v for k, v in result["sanity"].items() if k != "unit_seconds"}
    print(json.dumps({"measured": result["measured"], "speedup_two_ranks": result["speedup_two_ranks"],
                      "sanity": sanity_summary}, indent=1))
    print(f"projection: {projection['hours']:.2f} h on {projection['gpus']} GPUs; wrote {args.out}")


if __name__ == "__main__":
    main()
