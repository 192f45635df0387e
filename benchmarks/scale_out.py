"""Does compressing across ranks (``compress.distributed``) pay, and what would LLaMA-2-70B DSF 0.5 take on 8×H100?

Measured: the whole packaged SmolLM2-135M at DSF 0.5 (``dsf compress`` defaults: Emma, 64 × 512 tokens, 40
iterations) on the CPU, once as 1 process × 2 threads and once as 2 ranks × 1 thread (``torch.distributed.run``, the
command ``dsf compress --nproc 2`` runs), each the wall time of the whole command (start-up, model load, calibration,
solves, writing the output). Both runs' layer errors are compared (equal when their factors are).

Modelled (``docs/scale-out.md``): the same 2-rank run predicted from the 1-process run's per-layer solve times (the
sanity check of the cost model), and LLaMA-2-70B on 8×H100 projected from
``benchmarks/results/solver-speed-h100.json``.

Full measurement (the lead runs it: about 2 × 13 minutes of both cores of an otherwise idle machine)::

    python benchmarks/scale_out.py

Smoke run (minutes; not a result)::

    python benchmarks/scale_out.py --samples 16 --seqlen 64 --iters 1 --out /tmp/scale-out-smoke.json

Only the projection, printed (seconds)::

    python benchmarks/scale_out.py --projection-only

Output: ``benchmarks/results/scale-out.json``: ``{"measured": [{"ranks", "threads_per_rank", "seconds", "model"}],
"projection": {"model", "gpus", "hours", "assumptions", ...}, "sanity": {...}, "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_meta  # noqa: E402
from compress.distributed import assign_owners, relaunch_command  # noqa: E402
from compress.output import REPORT_FILE, write_json_atomic  # noqa: E402

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
    # units (same-shape members of each input group): q | k,v | o | gate,up | down; (members, out, in)
    shapes = [(1, h, h), (2, kv, h), (1, h, h), (2, f, h), (1, h, f)]
    units = [(m, o, i, m * _solve_s(fit, o, i)) for m, o, i in shapes]
    solve_wall, loads = _block_wall(units, gpus)
    one_gpu = sum(u[3] for u in units)
    chunks = a["samples"] // a["batch_size"]
    per_rank = chunks // gpus
    # Hessian partials: for each (input group, owner), the other ranks' chunks, in² fp32 each
    owners = assign_owners([_proxy_cost(m, o, i) for m, o, i, _ in units], gpus)
    group_of = [0, 0, 1, 2, 3]  # qkv, o, gate/up, down
    inputs = [h, h, h, f]
    pairs = {(g, o) for g, o in zip(group_of, owners)}
    hessian_bytes = sum((chunks - per_rank) * inputs[g] ** 2 * 4 for g, _ in pairs)
    factor_bytes = sum(m * (o * min(o, i) + min(o, i) * i) * 4 for m, o, i in shapes)
    params = sum(m * o * i for m, o, i in shapes)
    tokens_per_rank = per_rank * a["batch_size"] * a["seqlen"]
    forward_s = 2 * (2 * params * tokens_per_rank) / (a["forward_tflops"] * 1e12)  # H pass + output pass
    move_s = 2 * params * a["weight_bytes"] / (a["host_to_gpu_gb_per_s"] * 1e9)
    comm_s = hessian_bytes / (a["p2p_gb_per_s"] * 1e9) + factor_bytes / (a["broadcast_gb_per_s"] * 1e9)
    block_s = solve_wall + comm_s + forward_s + move_s
    total_s = a["model_load_s"] + blocks * block_s
    solve_peak_gb = _solve_memory_gb(solver_speed, f, h) * 2  # the gate+up batch, the largest unit
    return {
        "model": "LLaMA-2-70B (80 blocks, 8192/28672, GQA 8 kv heads), DSF density 0.5, 40 iterations",
        "gpus": gpus,
        "hours": total_s / 3600,
        "per_block_s": {"solve_wall": solve_wall, "rank_loads": loads, "hessian_and_factor_comm": comm_s,
                        "forwards": forward_s, "weights_to_gpu": move_s, "total": block_s},
        "one_gpu_hours": (a["model_load_s"] + blocks * (one_gpu + forward_s * gpus + move_s)) / 3600,
        "unit_solve_s": {name: u[3] for name, u in zip(("q", "k+v", "o", "gate+up", "down"), units)},
        "bytes_per_block_gb": {"hessian_partials": hessian_bytes / 1e9, "factors_broadcast": factor_bytes / 1e9},
        "memory_per_rank_gb": {
            "block_weights_bf16_plus_fp32_copy": params * (a["weight_bytes"] + 4) / 1e9,
            "activations_in_out": 2 * tokens_per_rank * h * a["weight_bytes"] / 1e9,
            "local_hessian_partials": per_rank * sum(n * n * 4 for n in (h, h, h, f)) / 1e9,
            "down_proj_hessian_owner_sum_plus_receive_buffer": 2 * f * f * 4 / 1e9,
            "largest_solve_gate_up_batch": solve_peak_gb,
            "host_ram_model_copy_per_rank": params * blocks * a["weight_bytes"] / 1e9,
        },
        "assumptions": {**a, "solve_time_fit": {"a_s_per_k2q": fit[0], "b_s_per_k3": fit[1],
                                                "source": str(SOLVER_SPEED.relative_to(RESULTS.parents[1]))}},
    }


def _solve_memory_gb(solver_speed: dict, out_features: int, in_features: int) -> float:
    """Peak solve memory of one layer, scaled by ``out·in`` from the largest measured row."""
    row = max(solver_speed["rows"], key=lambda r: r["out"] * r["in"])
    return row["peak_memory_gb"] * out_features * in_features / (row["out"] * row["in"])


def predict_two_ranks(report: dict, seconds_one: float, thread_factor: float) -> dict[str, Any]:
    """The 2-rank wall time predicted from the 1-process run (its ``compression_report.json`` and wall time):
    the solves become ``Σ_blocks max_rank load`` at ``thread_factor`` × the 2-thread solve time, the rest (start-up,
    load, forwards over half the windows on half the threads, writing) stays as it was."""
    layers = report["layer_errors"]["layers"]
    leaf_group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp-in", "up_proj": "mlp-in"}
    units: dict[tuple[str, str, int, int], list[float]] = {}  # (block, input group, out, in): q|k+v|o|gate+up|down
    for row in layers:
        block, _, leaf = row["name"].rpartition(".")
        units.setdefault((block, leaf_group.get(leaf, leaf), *row["shape"]), []).append(row["seconds"])
    per_block: dict[str, list[tuple[int, int, int, float]]] = {}
    for (block, _, out_features, in_features), seconds in units.items():
        per_block.setdefault(block, []).append((len(seconds), out_features, in_features, thread_factor * sum(seconds)))
    solves_one = sum(row["seconds"] for row in layers)
    solves_two = sum(_block_wall(block_units, 2)[0] for block_units in per_block.values())
    return {"predicted_seconds": seconds_one - solves_one + solves_two, "solve_seconds_one_process": solves_one,
            "solve_seconds_two_ranks": solves_two, "thread_factor": thread_factor}


def measure_thread_factor() -> float:
    """Solve time of one SmolLM2 MLP-shaped DSF layer (1536×576, 10 iterations) on 1 thread over 2 threads."""
    from compress.solvers import make_config, solve

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator)
    x = torch.randn(4096, 576, generator=generator)
    hessian = 2 * x.T @ x / 8
    config = make_config("dsf", 0.5, iters=10)
    times = {}
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            solve(weight, hessian, config)  # warm-up
            start = time.perf_counter()
            solve(weight, hessian, config)
            times[threads] = time.perf_counter() - start
    finally:
        torch.set_num_threads(saved)
    return times[1] / times[2]


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
    args = parser.parse_args()
    projection = project_llama70b(json.loads(SOLVER_SPEED.read_text()))
    if args.projection_only:
        print(json.dumps(projection, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="scale-out-") as work:
        one, two = Path(work) / "one", Path(work) / "two"
        seconds_one = _timed([sys.executable, "-m", "dsf_cli.main", *_compress_args(args, one)], threads=2)
        seconds_two = _timed(relaunch_command(2, _compress_args(args, two)), threads=1)
        report_one = json.loads((one / REPORT_FILE).read_text())
        report_two = json.loads((two / REPORT_FILE).read_text())
    model = f"SmolLM2-135M DSF 0.5 (Emma {args.samples}×{args.seqlen}, {args.iters} iterations), CPU"
    sanity = predict_two_ranks(report_one, seconds_one, measure_thread_factor())
    difference = _max_relative_error_difference(report_one, report_two)
    result = {
        "measured": [
            {"ranks": 1, "threads_per_rank": 2, "seconds": seconds_one, "model": model},
            {"ranks": 2, "threads_per_rank": 1, "seconds": seconds_two, "model": model},
        ],
        "speedup_two_ranks": seconds_one / seconds_two,
        "layer_errors_max_relative_difference": difference,
        "sanity": {**sanity, "measured_seconds": seconds_two,
                   "model_error": sanity["predicted_seconds"] / seconds_two - 1},
        "projection": projection,
        "meta": {**run_meta("cpu"), "cpus": os.cpu_count()},
        "note": ("wall time of the whole `dsf compress` command; 2 ranks = `dsf compress --nproc 2` "
                 "(torch.distributed.run, gloo, OMP_NUM_THREADS=1 per rank); layer errors compared because "
                 "the factors are bit-identical only for the same threads per process"),
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("measured", "speedup_two_ranks", "sanity")}, indent=1))
    print(f"projection: {projection['hours']:.2f} h on {projection['gpus']} GPUs; wrote {args.out}")


if __name__ == "__main__":
    main()
