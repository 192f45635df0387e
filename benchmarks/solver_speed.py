"""How long does DSF take to solve one layer, and is it as good as the unoptimized reference algorithm?

Unattended GPU run (the acceptance targets, H100: ≤ 1.2 s, 1.6 s, 1.6 s per layer at the reference's error)::

    python benchmarks/solver_speed.py --device cuda --reference --out benchmarks/results/solver-speed-h100.json

3×TF32 products against fp32 and the reference (``benchmarks/gpu_solver.sh`` runs it, about 3 minutes)::

    python benchmarks/solver_speed.py --device cuda --reference --matmul fp32,3xtf32 --repeats 2 \
        --out solver-speed-h100-3xtf32.json

The CPU comparison at one eighth of the LLaMA-2-7B shapes (about 2 minutes on 2 cores)::

    python benchmarks/solver_speed.py --device cpu --shapes llama2-7b-eighth --reference --matmul fp32,3xtf32 \
        --repeats 3 --out benchmarks/results/solver-speed-cpu.json

CPU smoke run (a full 40-iteration solve of a 4096-wide layer takes tens of minutes on 2 cores)::

    python benchmarks/solver_speed.py --device cpu --shapes 256x256,256x640 --iters 2 --out /tmp/speed.json

Inputs per shape (out×in): a synthetic correlated Hessian ``H = 2·XᵀX/N`` from ``X = G + L·F`` [N, in]
(``G`` Gaussian, 64 shared latent factors ``L·F`` correlating the columns, 8 outlier channels ×20,
``N = 2·in``) and ``W`` Gaussian plus a rank-8 component; fp32 with TF32 off, DSF at ``--density``.
Timing: one warm-up solve, then ``--repeats`` solves (device-synchronized wall time, median reported).
With ``--iters N`` other than 40, a 1-iteration solve is also timed and the 40-iteration time is projected as
``T(1) + 39·(T(N) − T(1))/(N − 1)``; records say which numbers are measured and which projected.
``--reference`` also times ``tests/compress/dsf_reference.py`` (``torch.inverse``, full sorts) on the same inputs.

Records (``results["rows"]``, one per shape and ``--matmul`` precision): ``{"shape", "out", "in", "batch",
"density", "iters", "matmul", "seconds", "median_s", "relative_error", "peak_memory_gb", "per_iter_s",
"projected_40_iter_s", "reference_median_s", "speedup_vs_reference", "error_vs_reference",
"reference_relative_error"}``; ``seconds`` lists the repeats, all times are per layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, git_sha, utc_now  # noqa: E402
from compress.solvers import DSFConfig, solve_group  # noqa: E402
from compress.solvers.base import exact_fp32, layer_error  # noqa: E402
from compress.solvers.products import MATMUL_PRECISIONS  # noqa: E402
from tests.compress import dsf_reference  # noqa: E402

logger = logging.getLogger("solver_speed")

SHAPE_SETS = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama2-7b-eighth": [(512, 512), (1376, 512), (512, 1376)],
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    if text in SHAPE_SETS:
        return SHAPE_SETS[text]
    try:
        return [(int(o), int(i)) for o, i in (item.lower().split("x") for item in text.split(","))]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(SHAPE_SETS)} or OUTxIN[,OUTxIN...], got {text!r}"
        ) from error


def _parse_precisions(text: str) -> list[str]:
    precisions = text.split(",")
    unknown = [p for p in precisions if p not in MATMUL_PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {unknown}; choose from {', '.join(MATMUL_PRECISIONS)}")
    return precisions


def synthetic_layer(
    out_features: int, in_features: int, batch: int, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``batch`` weights [out, in] and one correlated Hessian [in, in] with outlier channels (fp32, on ``device``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = 2 * in_features
    inputs = torch.randn(samples, in_features, generator=generator, device=device)
    latent = torch.randn(samples, 64, generator=generator, device=device)
    inputs += latent @ torch.randn(64, in_features, generator=generator, device=device) / 4
    inputs[:, :8] *= 20
    with exact_fp32():
        hessian = 2 * inputs.T @ inputs / samples
    del inputs
    weights = []
    for _ in range(batch):
        noise = torch.randn(out_features, in_features, generator=generator, device=device)
        low_rank = torch.randn(out_features, 8, generator=generator, device=device) @ torch.randn(
            8, in_features, generator=generator, device=device
        )
        weights.append((noise + low_rank) / in_features**0.5)
    return weights, hessian


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_dsf(weights, hessian, config: DSFConfig, repeats: int) -> tuple[list[float], float]:
    """Per-layer seconds of ``repeats`` solves and the mean relative error of the last one."""
    seconds = []
    for _ in range(repeats):
        _sync(hessian.device)
        start = time.perf_counter()
        results = solve_group(weights, hessian, config)
        _sync(hessian.device)
        seconds.append((time.perf_counter() - start) / len(weights))
    return seconds, statistics.fmean(r.relative_error for r in results)


def _time_reference(weights, hessian, density: float, iters: int) -> tuple[float, float]:
    """Per-layer seconds and mean relative error of the reference port (one run per weight)."""
    total, errors = 0.0, []
    with exact_fp32():
        for weight in weights:
            _sync(hessian.device)
            start = time.perf_counter()
            approx, _, _ = dsf_reference.factorize(weight, hessian, density, iters=iters)
            _sync(hessian.device)
            total += time.perf_counter() - start
            errors.append(layer_error(weight, approx, hessian)[1])
    return total / len(weights), statistics.fmean(errors)


def _bench_shape(shape: tuple[int, int], args: argparse.Namespace, device: torch.device, matmul: str,
                 references: dict[tuple[int, int], tuple[float, float]]) -> dict:
    """One row: DSF of ``shape`` with ``matmul`` products; the reference's time and error (with ``--reference``)
    are measured once per shape and kept in ``references``."""
    out_features, in_features = shape
    weights, hessian = synthetic_layer(out_features, in_features, args.batch, device)
    config = DSFConfig(density=args.density, iters=args.iters, matmul=matmul)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, error = _time_dsf(weights, hessian, config, args.repeats)
    median = statistics.median(seconds)
    record = {
        "shape": f"{out_features}x{in_features}",
        "out": out_features,
        "in": in_features,
        "batch": args.batch,
        "density": args.density,
        "iters": args.iters,
        "matmul": matmul,
        "seconds": seconds,
        "median_s": median,
        "relative_error": error,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "per_iter_s": None,
        "projected_40_iter_s": None,
    }
    if args.iters > 1:
        one, _ = _time_dsf(weights, hessian, DSFConfig(density=args.density, iters=1, matmul=matmul), 1)
        per_iter = (median - one[0]) / (args.iters - 1)
        record["per_iter_s"] = per_iter
        if args.iters != 40:
            record["projected_40_iter_s"] = one[0] + 39 * per_iter
    if args.reference:
        if shape not in references:
            references[shape] = _time_reference(weights, hessian, args.density, args.iters)
        ref_seconds, ref_error = references[shape]
        record["reference_median_s"] = ref_seconds
        record["reference_relative_error"] = ref_error
        record["speedup_vs_reference"] = ref_seconds / median
        record["error_vs_reference"] = error / ref_error
    return record


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[dict]) -> str:
    lines = [f"{'shape':>12} {'matmul':>6} {'b':>2} {'iters':>5} {'median s':>9} {'proj. 40 s':>10} {'rel err':>9} "
             f"{'ref s':>8} {'ref rel err':>11}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['shape']:>12} failed: {row['error']}")
            continue
        lines.append(
            f"{row['shape']:>12} {row['matmul']:>6} {row['batch']:>2} {row['iters']:>5} {row['median_s']:>9.3f} "
            f"{_cell(row['projected_40_iter_s'], 3):>10} {row['relative_error']:>9.5f} "
            f"{_cell(row.get('reference_median_s'), 3):>8} {_cell(row.get('reference_relative_error'), 5):>11}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to solve (default: cuda when available)")
    parser.add_argument("--shapes", type=_parse_shapes, default=SHAPE_SETS["llama2-7b"],
                        help=f"a shape set ({', '.join(SHAPE_SETS)}) or OUTxIN[,OUTxIN...] (default: llama2-7b)")
    parser.add_argument("--iters", type=int, default=40, help="DSF outer iterations (default: 40, the reference's)")
    parser.add_argument("--density", type=float, default=0.5, help="kept fraction of each layer (default: 0.5)")
    parser.add_argument("--batch", type=int, default=1,
                        help="same-shape layers sharing H solved as one group, e.g. 3 for q/k/v (default: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed solves per shape (default: 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--reference", action="store_true", help="also time the unoptimized reference port")
    parser.add_argument("--matmul", type=_parse_precisions, default=["fp32"],
                        help="solver product precisions to time, comma-separated: fp32, 3xtf32 (default: fp32)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; pass --device cpu")
    if args.reference and args.iters < 4:
        parser.error("--reference needs --iters >= 4: the reference's schedule t/(iters − 3) breaks below that")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (3 if args.device == "cuda" else 1)
    device = torch.device(args.device)

    warm_weights, warm_hessian = synthetic_layer(64, 96, args.batch, device)
    solve_group(warm_weights, warm_hessian, DSFConfig(density=args.density, iters=2))

    results = {
        "question": "DSF solve time per layer (fp32 with TF32 off, or 3xTF32 products) and its error vs the "
                    "unoptimized reference",
        "device": device_name(device),
        "torch": torch.__version__,
        "date": utc_now(),
        "git_sha": git_sha(),
        "settings": {
            "iters": args.iters,
            "density": args.density,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
        "rows": [],
    }
    references: dict[tuple[int, int], tuple[float, float]] = {}
    for shape in args.shapes:
        for matmul in args.matmul:
            logger.info("solving %dx%d (%s) ...", *shape, matmul)
            try:
                row = _bench_shape(shape, args, device, matmul, references)
            except torch.OutOfMemoryError as error:
                row = {"shape": f"{shape[0]}x{shape[1]}", "matmul": matmul,
                       "error": f"out of memory: {error}".splitlines()[0]}
                torch.cuda.empty_cache()
            results["rows"].append(row)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['device']}, torch {results['torch']}, density {args.density}")
    print(_table(results["rows"]))
    if args.iters != 40:
        print(f"measured with {args.iters} outer iterations; 'proj. 40 s' is projected, not measured")


if __name__ == "__main__":
    main()
