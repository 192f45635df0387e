"""Perplexity against stored bytes for SmolLM2-135M: sparse factors with float or quantized values (issue #11).

Each point compresses the packaged SmolLM2-135M-Instruct through ``compress.api.compress_model`` (calibration:
*Emma*, ``--samples`` windows of 512 tokens, seed 0; the issue's standard setting is 64 windows and DSF's 40
iterations, the defaults here), writes the compressed directory (``--layout auto``, fp16 scales and tensors, the
embedding as stored: ``--embedding keep``, so that ``bytes_ratio`` is the linears alone), reloads it through
``dsf_runtime.from_pretrained`` on the CPU and measures Persuasion perplexity on the first ``--windows`` windows of
1024 tokens (``compress.evaluate``). ``bytes_ratio`` = the stored bytes of the compressed linears (indices, values,
scales, biases) / their dense fp16 bytes, from the file headers (``CompressedCheckpoint.size_summary``).

A point is ``METHOD:DENSITY:VALUES``, e.g. ``dsf:0.5:int8``; ``VALUES`` is ``fp16``, ``int8`` or ``fp8`` (what
files can store; int4 has no file encoding yet). ``magnitude:1.0:int8`` is the dense model quantized by error
feedback (GPTQ int8). Points already in ``--out`` are skipped, so an interrupted sweep continues.

    python benchmarks/frontier_smollm2.py --points dsf:0.5:fp16,dsf:0.5:int8,dsf:0.5:fp8 \\
        --out benchmarks/results/frontier-smollm2.json

The output has the issue's format: ``{"dense_perplexity", "points": [{"method", "density", "values",
"bytes_ratio", "perplexity"}]}`` plus the settings, each point's compression seconds and which points lie on the
Pareto front (no other point has fewer or equal bytes and a lower perplexity).
"""

from __future__ import annotations

import argparse
import datetime
import json
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


def pareto(points: list[dict]) -> list[dict]:
    """``points`` with ``pareto`` set: True when no other point has ``bytes_ratio`` ≤ and ``perplexity`` <."""
    for p in points:
        p["pareto"] = not any(q is not p and q["bytes_ratio"] <= p["bytes_ratio"] and q["perplexity"] < p["perplexity"]
                              for q in points)
    return points


def run_point(point: str, args: argparse.Namespace, windows: torch.Tensor, scratch: Path) -> dict:
    """Compress, reload and evaluate one ``METHOD:DENSITY:VALUES`` point."""
    method, density, values = point.split(":")
    options = {"iters": args.iters} if method == "dsf" else {}
    config = CompressConfig(method=method, density=float(density), solver_options=options, samples=args.samples,
                            seqlen=512, device="cpu", save_dtype="float16", embedding="keep",
                            values="float" if values == "fp16" else values)
    out = scratch / point.replace(":", "-")
    start = time.perf_counter()
    compress_model(config, out, resume=out.exists(), progress=not args.quiet)
    seconds = time.perf_counter() - start
    with open_compressed(out) as ckpt:
        size = ckpt.size_summary()
    model = from_pretrained(out)
    ppl = perplexity(model, windows, progress=not args.quiet).perplexity
    del model
    shutil.rmtree(out)
    return {"method": method, "density": float(density), "values": values, "bytes_ratio": size["linear_ratio"],
            "perplexity": ppl, "compress_seconds": seconds}


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    windows = load_evaluation(tokenizer, "persuasion", 1024, args.windows)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "dense_perplexity" not in result:
        dense = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
        result["dense_perplexity"] = perplexity(dense, windows, progress=not args.quiet).perplexity
        del dense
    load_before = os.getloadavg()
    done = {(p["method"], p["density"], p["values"]) for p in result.get("points", [])}
    for point in args.points.split(","):
        method, density, values = point.split(":")
        if (method, float(density), values) in done:
            continue
        result.setdefault("points", []).append(run_point(point, args, windows, args.scratch))
        result.update({
            "machine": machine(args.threads, load_before), "date": datetime.date.today().isoformat(),
            "calibration": f"Emma, {args.samples} windows of 512 tokens, seed 0; DSF {args.iters} iterations",
            "eval": f"Persuasion, first {int(windows.shape[0])} windows of 1024 tokens",
            "bytes": "stored bytes of the compressed linears / their dense fp16 bytes (embedding excluded)",
        })
        pareto(result["points"])
        write_json_atomic(args.out, result)
        print(json.dumps(result["points"][-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
