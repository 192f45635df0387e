"""Issue 10's layer sweep: the tile-bitmap tensor-core kernel (``tile`` layout) against cuBLAS fp16 and the existing
decode kernels, batch 1 to 2048, on the three LLaMA-7B shapes.

Per shape, DSF at density 0.5 and 0.3 with DSF's factor split (``propose_balanced_split``), random masks. Each row
times, with weights rotated over copies larger than the L2 and CUDA-graph replays (``benchmarks.common.time_calls``):

- ``dense_us``: ``F.linear`` fp16 (cuBLAS);
- ``nibble_us`` / ``delta_us``: ``dispatch.linear`` ``auto`` on the existing kernel layouts (balanced masks for
  ``nibble``, unstructured for ``delta``);
- ``tile_us``: ``tile_matmul`` (what ``dispatch`` path ``tile`` runs) on the unstructured factors stored as ``tile``,
  the fastest correct config of a small sweep (tile 16×64 or 32×64 × ``configs.tile_candidates``: ``BN`` 16/64,
  ``SPLIT_K`` 1/4) at the swept batches (``SWEEP_BATCHES``), the best swept config of the nearest swept batch
  elsewhere; ``tile_configs`` has every swept time (or its error).

``--tuning-file PATH`` writes the swept winners into a kernel tuning file (``dsf_runtime.kernels.tuning``): one
``tile`` entry per factor shape and swept token bucket (density 0.5's winner where 0.5 and 0.3 share a factor
shape), which ``configs.tile_config`` then reads for ``dispatch``'s ``tile`` path.

Every swept config and every row is first checked against a float64 reference on NaN-poisoned memory
(``rel_err``; a config above ``MAX_REL_ERR`` is not chosen). Output: JSON (``--out``, rewritten after every row, so
a run cut short keeps its rows) and a PNG of speedup over dense against batch, one panel per shape.

    python -m benchmarks.bench_tile --out benchmarks/results/tile-h100.json      # about 4 minutes on an H100
    python -m benchmarks.bench_tile --tuning-file dsf_runtime/kernels/tuned/<gpu>.json ...
    TRITON_INTERPRET=1 DSF_INTERPRET_KERNELS=1 python -m benchmarks.bench_tile --cpu-dry-run --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_layer import _copies, _poison, _reference, _rel_err, _time, make_case  # noqa: E402
from benchmarks.common import DRY_RUN_CAVEAT, run_meta  # noqa: E402
from dsf_runtime.formats import DeltaMatrix, NibbleMatrix, TileMatrix  # noqa: E402
from dsf_runtime.kernels import configs, tuning  # noqa: E402
from dsf_runtime.kernels.dispatch import linear  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = (1, 2, 8, 16, 32, 64, 128, 256, 2048)
SWEEP_BATCHES = (16, 64, 256)
DENSITIES = (0.5, 0.3)
TILES = ((16, 64), (32, 64))
MAX_REL_ERR = 1e-2
DRY_RUN = {"shapes": [(48, 96)], "batches": (1, 17), "sweep": (17,), "densities": (0.5,), "tiles": ((16, 64),)}


def _tile_fn(x, ks, config):
    return lambda: linear_tile(x, ks, config)


def linear_tile(x: torch.Tensor, ks: list, config: dict) -> torch.Tensor:
    """``A·(B·x)`` (or ``W·x``) through ``tile_matmul`` with ``config``, intermediates in the weights' dtype."""
    from dsf_runtime.kernels.tile_matmul import tile_matmul

    h = x
    for k in reversed(ks):
        h = tile_matmul(h, k, config=config)
    return h


def _nearest(batch: int, swept: dict) -> tuple:
    """Best (tile, config) of the swept batch nearest to ``batch`` (in log scale)."""
    b = min(swept, key=lambda s: abs(math.log2(s) - math.log2(batch)))
    return swept[b]


def _sweep(x, ref, tiled, tiles, batch, repeats, dev) -> dict:
    """``{name: (us or None, tile, config, note)}`` of every config: timed when it runs and is correct."""
    times = {}
    for tile, cfg in itertools.product(tiles, configs.tile_candidates(batch)):
        label = f"{tile[0]}x{tile[1]} BN{cfg['BN']} SK{cfg['SPLIT_K']}"
        try:
            _poison(dev)
            err = _rel_err(linear_tile(x, tiled[tile][0], cfg), ref)
            if not err <= MAX_REL_ERR:
                times[label] = (None, tile, cfg, f"rel_err {err}")
                continue
            us = _time([_tile_fn(x, ks, cfg) for ks in tiled[tile]], batch, repeats)["us"]
            times[label] = (us, tile, cfg, None)
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is recorded, not fatal
            times[label] = (None, tile, cfg, repr(exc)[:200])
    return times


def run(shapes, batches, sweep_batches, densities, tiles, repeats: int, max_seconds: float, log=print,
        out: Path | None = None):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    t0 = time.time()
    rows, skipped = [], []
    meta = run_meta(dev, method=__doc__.split("\n\n")[0], packages=("triton",)) | {"dry_run": dev.type != "cuda"}

    def result() -> dict:
        meta["seconds"] = round(time.time() - t0, 1)
        return {"meta": meta, "rows": sorted(rows, key=lambda r: (r["shape"], r["density"], r["batch"])),
                "skipped": skipped}

    for shape, density in itertools.product(shapes, densities):
        m, n = shape
        if time.time() - t0 > max_seconds:
            skipped += [[list(shape), density, batch] for batch in batches]
            continue
        unstructured = make_case(shape, "dsf", density, "delta", torch.float16, dev)
        balanced = make_case(shape, "dsf", density, "nibble", torch.float16, dev)
        layouts = {
            "nibble": _copies([NibbleMatrix.from_dense(f, group=16) for f in balanced["factors"]]),
            "delta": _copies([DeltaMatrix.from_dense(f) for f in unstructured["factors"]]),
        }
        tiled = {t: _copies([TileMatrix.from_dense(f, tile_rows=t[0], tile_cols=t[1]) for f in unstructured["factors"]])
                 for t in tiles}
        w = torch.randn(m, n, device=dev, dtype=torch.float16)
        dense = [w] + [w.clone() for _ in range(len(layouts["delta"]) - 1)]
        swept: dict = {}
        for batch in sorted(batches, key=lambda b: (b not in sweep_batches, b)):
            if time.time() - t0 > max_seconds:
                skipped.append([list(shape), density, batch])
                continue
            x = torch.randn(batch, n, device=dev, dtype=torch.float16)
            ref = _reference(x, unstructured["factors"])
            row = {"shape": list(shape), "kind": "dsf", "density": density, "batch": batch,
                   "dense_us": round(_time([lambda w=w: F.linear(x, w) for w in dense], batch, repeats)["us"], 3)}
            for name, copies in layouts.items():
                row[f"{name}_us"] = round(_time([lambda ks=ks: linear(x, ks) for ks in copies], batch, repeats)["us"], 3)
            if batch in sweep_batches:
                times = _sweep(x, ref, tiled, tiles, batch, repeats, dev)
                ran = [k for k, v in times.items() if v[0] is not None]
                if ran:
                    best = min(ran, key=lambda k: times[k][0])
                    swept[batch] = times[best][1:3]
                row["tile_configs"] = {k: round(v[0], 3) if v[0] is not None else v[3] for k, v in times.items()}
            tile, cfg = _nearest(batch, swept) if swept else (tiles[0], configs.tile_heuristic(
                tiled[tiles[0]][0][0].grid, batch))
            _poison(dev)
            row["rel_err"] = _rel_err(linear_tile(x, tiled[tile][0], cfg), ref)
            row["tile_us"] = round(_time([_tile_fn(x, ks, cfg) for ks in tiled[tile]], batch, repeats)["us"], 3)
            row["tile_config"] = {"tile": list(tile), **cfg}
            row["factor_shapes"] = [list(k.shape) for k in tiled[tile][0]]
            row["tile_bytes"] = sum(k.nbytes for k in tiled[tile][0])
            row["nibble_bytes"] = sum(k.nbytes for k in layouts["nibble"][0])
            row["delta_bytes"] = sum(k.nbytes for k in layouts["delta"][0])
            for name in ("tile", "nibble", "delta"):
                row[f"{name}_speedup"] = round(row["dense_us"] / row[f"{name}_us"], 3)
            rows.append(row)
            if out is not None:
                out.write_text(json.dumps(result(), indent=1) + "\n")
            log(f"{m}x{n} d={density} b={batch}: dense {row['dense_us']:.1f} us, tile x{row['tile_speedup']:.2f} "
                f"({row['tile_config']}), nibble x{row['nibble_speedup']:.2f}, delta x{row['delta_speedup']:.2f}, "
                f"err {row['rel_err']:.1e}")
        del layouts, tiled, dense
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result()


def tuning_entries(results: dict) -> list[dict]:
    """The tuning file's ``tile`` entries of a run: for each swept row (one with ``tile_configs``), the winning
    config for every factor shape of the row's chain at ``configs.token_bucket(batch)``; higher densities first,
    so where two densities share a factor shape the denser one's winner is kept."""
    entries: dict = {}
    rows = sorted((r for r in results["rows"] if "tile_configs" in r), key=lambda r: (-r["density"], r["batch"]))
    for r in rows:
        config = {k: v for k, v in r["tile_config"].items() if k != "tile"}
        for rows_, cols in r["factor_shapes"]:
            key = (rows_, cols, configs.token_bucket(r["batch"]))
            entries.setdefault(key, {"layout": "tile", "rows": rows_, "per_row": cols, "tokens": key[2],
                                     "config": config, "us": r["tile_us"], "tile_shape": r["tile_config"]["tile"],
                                     "density": r["density"]})
    return list(entries.values())


def plot(results: dict, out: Path) -> Path:
    """Speedup over cuBLAS fp16 against batch, one panel per shape, a line per kernel and density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(r["shape"]) for r in results["rows"]})
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(5 * max(len(shapes), 1), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for density, name in itertools.product(sorted({r["density"] for r in results["rows"]}), ("tile", "nibble",
                                                                                                   "delta")):
            pts = [(r["batch"], r[f"{name}_speedup"]) for r in results["rows"]
                   if tuple(r["shape"]) == shape and r["density"] == density]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{name} {density}", linestyle="-" if name == "tile" else "--")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (batch)")
        ax.set_ylabel("speedup over cuBLAS fp16")
        ax.set_title(f"{shape[0]}×{shape[1]} DSF" + (" — " + DRY_RUN_CAVEAT if results["meta"]["dry_run"] else ""),
                     fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tile.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=220.0, help="stop starting new rows after this")
    ap.add_argument("--tuning-file", type=Path, default=None, help="also write the swept winners as 'tile' entries "
                    "of this kernel tuning file (merged into it if it exists)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes in the Triton interpreter (needs "
                    "TRITON_INTERPRET=1 and DSF_INTERPRET_KERNELS=1); not a speed measurement")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("bench_tile needs a CUDA GPU; --cpu-dry-run checks the code paths on the CPU", file=sys.stderr)
        return 2
    if args.cpu_dry_run and not torch.cuda.is_available():
        print(DRY_RUN_CAVEAT)
        d = DRY_RUN
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results = run(d["shapes"], d["batches"], d["sweep"], d["densities"], d["tiles"], 1, 60.0, out=args.out)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results = run(SHAPES, BATCHES, SWEEP_BATCHES, DENSITIES, TILES, args.repeats, args.max_seconds, out=args.out)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.tuning_file is not None:
        found = {"device": configs.device_name() or "cpu-dry-run", "matmul": tuning_entries(results), "unpack": []}
        print(tuning.write_tuning(args.tuning_file, found, source="benchmarks/bench_tile.py"))
    print(plot(results, args.out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
