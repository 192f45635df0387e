"""What does calibrating every block on the dense model's activations cost in perplexity (issue #13)?

The sequential pipeline (the reference) calibrates block ``i`` on the outputs of the already compressed blocks
``0..i-1``; ``--pipeline dense-inputs`` (``CompressConfig.pipeline``) calibrates it on the dense model's
activations, which would let ranks solve different blocks at once. Both compress the packaged SmolLM2-135M at
DSF 0.5 with the same windows (*Emma*, ``--samples`` × 512 tokens, seed 0, ``--iters`` DSF iterations; fp16
factors, the embedding kept), reload through ``dsf_runtime.from_pretrained`` on the CPU and measure Persuasion
perplexity on the first ``--windows`` windows of 1024 tokens (``compress.evaluate``), the setting of
``frontier_smollm2.py``. Runs already in ``--out`` are skipped.

    python benchmarks/pipeline_inputs.py --samples 16 --iters 20 --out benchmarks/results/pipeline-inputs-smollm2.json

Output: ``{"dense_perplexity", "runs": [{"pipeline", "perplexity", "mean_relative_error", "compress_seconds"}],
"calibration", "eval", "machine", "date"}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_decode import machine  # noqa: E402
from benchmarks.frontier_smollm2 import compress_and_evaluate, persuasion_and_dense  # noqa: E402
from compress.api import PIPELINES, CompressConfig  # noqa: E402
from compress.output import write_json_atomic  # noqa: E402


def run(pipeline: str, args: argparse.Namespace, windows: torch.Tensor) -> dict:
    """Compress SmolLM2 with ``pipeline``, reload it and measure its perplexity on ``windows``."""
    config = CompressConfig(method="dsf", density=0.5, solver_options={"iters": args.iters}, samples=args.samples,
                            seqlen=512, device="cpu", save_dtype="float16", embedding="keep", pipeline=pipeline)
    run = compress_and_evaluate(config, args.scratch / pipeline, windows, progress=not args.quiet)
    layers = run["report"]["layer_errors"]["layers"]
    return {"pipeline": pipeline, "perplexity": run["perplexity"],
            "mean_relative_error": sum(r["relative_error"] for r in layers) / len(layers),
            "compress_seconds": run["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="Emma calibration windows of 512 tokens")
    parser.add_argument("--iters", type=int, default=20, help="DSF outer iterations")
    parser.add_argument("--windows", type=int, default=32, help="Persuasion windows of 1024 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("runs/pipeline-inputs"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline-inputs-smollm2.json"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    windows = persuasion_and_dense(result, args.windows, progress=not args.quiet)
    load_before = os.getloadavg()
    runs = result.setdefault("runs", [])
    for pipeline in PIPELINES:
        if any(r["pipeline"] == pipeline for r in runs):
            continue
        runs.append(run(pipeline, args, windows))
        result.update({
            "machine": machine(args.threads, load_before), "date": datetime.date.today().isoformat(),
            "calibration": f"Emma, {args.samples} windows of 512 tokens, seed 0; DSF 0.5, {args.iters} iterations",
            "eval": f"Persuasion, first {int(windows.shape[0])} windows of 1024 tokens",
        })
        write_json_atomic(args.out, result)
        print(json.dumps(runs[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
