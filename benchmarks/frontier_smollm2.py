"""Perplexity against stored bytes for SmolLM2-135M: sparse factors with float or quantized values (issue #11).

Each point compresses the packaged SmolLM2-135M-Instruct through ``compress.api.compress_model`` (calibration:
*Emma*, ``--samples`` windows of 512 tokens, seed 0; the issue's standard setting is 64 windows and DSF's 40
iterations, the defaults here), writes the compressed directory (``--layout auto``, fp16 scales and tensors, the
embedding as stored: ``--embedding keep``, so that ``bytes_ratio`` is the linears alone), reloads it through
``dsf_runtime.from_pretrained`` on the CPU and measures Persuasion perplexity on the first ``--windows`` windows of
1024 tokens (``compress.evaluate``). ``bytes_ratio`` = the stored bytes of the compressed linears (indices, values,
scales, biases) / their dense fp16 bytes, from the file headers (``CompressedCheckpoint.size_summary``).

A point is ``METHOD:DENSITY:VALUES[:ROUNDING]``, e.g. ``dsf:0.5:int8``; ``VALUES`` is ``fp16``, ``int8``, ``fp8``
or ``int4`` (group 128), or for DSF ``BIG+SMALL`` such as ``int4+int8`` (the factor with fewer kept values in
int8: ``--small-factor-values``); ``ROUNDING`` ``gptq`` (error feedback, the default) or ``rtn``. ``magnitude:1.0:int4`` is
the dense model quantized by GPTQ (int4, group 128), ``magnitude:1.0:int4:rtn`` by round-to-nearest. The dense
fp16 model is the point ``dense`` (bytes 1.0, the dense perplexity). Points already in ``--out`` are skipped, so an
interrupted sweep continues; ``--plot`` only redraws the PNG.

    python benchmarks/frontier_smollm2.py --points dsf:0.5:fp16,dsf:0.5:int8,dsf:0.5:fp8 \\
        --out benchmarks/results/frontier-smollm2.json

The output has the issue's format: ``{"dense_perplexity", "points": [{"method", "density", "values",
"bytes_ratio", "perplexity"}]}`` plus each point's ``rounding`` and compression seconds, the settings, and which
points lie on the Pareto front (no other point has fewer or equal bytes and a lower perplexity). A PNG of
perplexity against bytes is written beside the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_decode import machine  # noqa: E402
from compress.api import CompressConfig, compress_model  # noqa: E402
from compress.assets import smollm2_dir  # noqa: E402
from compress.data import load_evaluation  # noqa: E402
from compress.evaluate import perplexity  # noqa: E402
from compress.output import write_json_atomic  # noqa: E402
from dsf_runtime import from_pretrained  # noqa: E402
from dsf_runtime.checkpoint import open_compressed  # noqa: E402


def persuasion_and_dense(result: dict, count: int, *, progress: bool) -> torch.Tensor:
    """The first ``count`` Persuasion windows of 1024 tokens (int64 ``[count, 1024]``); sets
    ``result["dense_perplexity"]``, the dense fp32 SmolLM2's perplexity on them, unless ``result`` has it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = load_evaluation(AutoTokenizer.from_pretrained(smollm2_dir()), "persuasion", 1024, count)
    if "dense_perplexity" not in result:
        dense = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
        result["dense_perplexity"] = perplexity(dense, windows, progress=progress).perplexity
    return windows


def pareto(points: list[dict]) -> list[dict]:
    """``points`` with ``pareto`` set: True when no other point has ``bytes_ratio`` ≤ and ``perplexity`` <."""
    for p in points:
        p["pareto"] = not any(q is not p and q["bytes_ratio"] <= p["bytes_ratio"] and q["perplexity"] < p["perplexity"]
                              for q in points)
    return points


QUANTIZED = ("int8", "fp8", "int4")


def parse_point(point: str) -> tuple[str, float, str, str | None]:
    """``METHOD:DENSITY:VALUES[:ROUNDING]`` -> ``(method, density, values, rounding)``; rounding None for fp16.
    ``VALUES`` is ``fp16``, one of ``QUANTIZED``, or for DSF ``BIG+SMALL`` (e.g. ``int4+int8``: the factor with
    fewer kept values in ``SMALL``, ``--small-factor-values``)."""
    method, density, values, *rest = point.split(":")
    formats = values.split("+")
    valid = values == "fp16" or (all(f in QUANTIZED for f in formats) and len(formats) <= (2 if method == "dsf" else 1))
    if not valid or len(rest) > 1 or rest[:1] not in ([], ["gptq"], ["rtn"]):
        raise SystemExit(f"bad point {point!r}: expected METHOD:DENSITY:fp16|int8|fp8|int4[+int8|fp8|int4][:gptq|rtn]")
    if values == "fp16" and rest:
        raise SystemExit(f"bad point {point!r}: fp16 values have no rounding")
    return method, float(density), values, None if values == "fp16" else (rest or ["gptq"])[0]


def _key(p: dict) -> tuple:
    """Identity of a point (a point written before ``rounding`` was recorded used GPTQ)."""
    rounding = p.get("rounding", None if p["values"] == "fp16" else "gptq")
    return p["method"], p["density"], p["values"], rounding


def run_point(point: str, args: argparse.Namespace, windows: torch.Tensor, scratch: Path) -> dict:
    """Compress, reload and evaluate one ``METHOD:DENSITY:VALUES[:ROUNDING]`` point."""
    method, density, values, rounding = parse_point(point)
    options = {"iters": args.iters} if method == "dsf" else {}
    big, _, small = values.partition("+")
    config = CompressConfig(method=method, density=density, solver_options=options, samples=args.samples,
                            seqlen=512, device="cpu", save_dtype="float16", embedding="keep",
                            values="float" if values == "fp16" else big, small_factor_values=small or None,
                            rounding=rounding or "gptq")
    run = compress_and_evaluate(config, scratch / point.replace(":", "-"), windows, progress=not args.quiet)
    return {"method": method, "density": density, "values": values, "rounding": rounding,
            "bytes_ratio": run["size"]["linear_ratio"], "perplexity": run["perplexity"],
            "compress_seconds": run["seconds"]}


def compress_and_evaluate(config: CompressConfig, out: Path, windows: torch.Tensor, *, progress: bool) -> dict:
    """Compress with ``config`` into ``out`` (resuming an interrupted run there), reload it on the CPU, measure its
    perplexity on ``windows`` and remove ``out``; returns ``{"report", "seconds", "size", "perplexity"}``
    (``size``: ``CompressedCheckpoint.size_summary``)."""
    start = time.perf_counter()
    report = compress_model(config, out, resume=out.exists(), progress=progress)
    seconds = time.perf_counter() - start
    with open_compressed(out) as ckpt:
        size = ckpt.size_summary()
    model = from_pretrained(out)
    ppl = perplexity(model, windows, progress=progress).perplexity
    del model
    shutil.rmtree(out)
    return {"report": report, "seconds": seconds, "size": size, "perplexity": ppl}


def plot_frontier(result: dict, out: Path) -> Path:
    """Perplexity against bytes / dense fp16 for every point (Pareto points filled), written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"fp16": "o", "int8": "s", "fp8": "D", "int4": "^", "int4+int8": "v"}
    colors = {"dsf": "tab:blue", "sparsegpt": "tab:orange", "magnitude": "tab:green", "dense": "black"}
    # points drawn on one spot share a label: (bytes, perplexity, [(method and density, values)])
    spots: list[tuple[float, float, list[tuple[str, str]]]] = []
    for p in result["points"]:
        label = p["method"] if p["method"] != "magnitude" or p["density"] < 1 else "dense"
        color = colors.get(p["method"] if label != "dense" else "dense", "tab:gray")
        ax.scatter(p["bytes_ratio"], p["perplexity"], marker=markers.get(p["values"], "P"), s=60, color=color,
                   facecolors=color if p.get("pareto") else "none")
        name = (f"{label} {p['density']:g}", p["values"] + (" rtn" if p.get("rounding") == "rtn" else ""))
        spot = next((s for s in spots if abs(s[0] - p["bytes_ratio"]) < 0.004
                     and abs(math.log(s[1] / p["perplexity"])) < 0.03), None)
        if spot is None:
            spots.append((p["bytes_ratio"], p["perplexity"], [name]))
        else:
            spot[2].append(name)

    def close(a: tuple, b: tuple, dx: float) -> bool:
        return abs(a[0] - b[0]) < dx and abs(math.log(a[1] / b[1])) < 0.08

    placed: list[tuple[float, float]] = []  # anchors of labels drawn to the right
    for x, y, names in sorted(spots, key=lambda s: (s[0], -s[1])):
        if len({prefix for prefix, _ in names}) == 1:
            text = f"{names[0][0]} " + " / ".join(values for _, values in names)
        else:
            text = " / ".join(f"{prefix} {values}" for prefix, values in names)
        if any(close((x, y), s, 0.01) for s in spots if (s[0], s[1]) != (x, y)):
            # points stacked at the same bytes are labelled on the left, which is free of their own labels
            ax.annotate(text, (x, y), fontsize=7, xytext=(-5, -3), textcoords="offset points", ha="right")
            continue
        near = sum(1 for q in placed if close((x, y), q, 0.06))  # earlier labels this one would cover
        placed.append((x, y))
        ax.annotate(text, (x, y), fontsize=7, xytext=(4, 3 - 10 * near), textcoords="offset points")
    ax.set_xlabel("stored bytes of the linears / dense fp16")
    ax.set_ylabel("Persuasion perplexity")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"SmolLM2-135M: {result.get('calibration', '')}\nfilled = Pareto front", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="dsf:0.5:fp16,dsf:0.5:int8,dsf:0.5:fp8")
    parser.add_argument("--samples", type=int, default=64, help="Emma calibration windows of 512 tokens")
    parser.add_argument("--iters", type=int, default=40, help="DSF outer iterations")
    parser.add_argument("--windows", type=int, default=32, help="Persuasion windows of 1024 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/frontier-smollm2.json"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG of --out")
    args = parser.parse_args(argv)
    png = args.out.with_suffix(".png")
    if args.plot:
        print(plot_frontier(json.loads(args.out.read_text()), png))
        return 0
    torch.set_num_threads(args.threads)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    windows = persuasion_and_dense(result, args.windows, progress=not args.quiet)
    load_before = os.getloadavg()
    points = result.setdefault("points", [])
    if not any(p["method"] == "dense" for p in points):
        points.insert(0, {"method": "dense", "density": 1.0, "values": "fp16", "rounding": None, "bytes_ratio": 1.0,
                          "perplexity": result["dense_perplexity"], "compress_seconds": 0.0})
    done = {_key(p) for p in points}
    for point in args.points.split(","):
        if point == "dense" or parse_point(point) in done:
            continue
        points.append(run_point(point, args, windows, args.scratch))
        result.update({
            "machine": machine(args.threads, load_before), "date": datetime.date.today().isoformat(),
            "calibration": f"Emma, {args.samples} windows of 512 tokens, seed 0; DSF {args.iters} iterations",
            "eval": f"Persuasion, first {int(windows.shape[0])} windows of 1024 tokens",
            "bytes": "stored bytes of the compressed linears / their dense fp16 bytes (embedding excluded)",
        })
        pareto(points)
        write_json_atomic(args.out, result)
        plot_frontier(result, png)
        print(json.dumps(points[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
