"""CPU greedy decode of the real SmolLM2-135M: dense fp32, dense bf16, and a DSF-0.5-shaped model in ``bitmask``
fp16 (the compiled CPU kernel, ``dsf_runtime.kernels.cpu``).

Each row runs in a fresh subprocess (so peak RSS, from ``resource.getrusage``, is that model's alone): load the
model (``load_s``), generate ``--new-tokens`` greedily after a short prompt, batch 1; ``tok_s`` = new tokens /
seconds of that ``generate`` call (its prompt prefill included). The DSF model has random balanced factors at
density 0.5 (``benchmarks.e2e_models.random_dsf_factors``, k = min(out, in)) in place of every decoder linear,
fp16 values, the rest of the state dict in fp32: its text is meaningless, its bytes and speed are the real ones.

    python -m benchmarks.cpu_decode --out benchmarks/results/cpu-decode-smollm2.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from compress.assets import cache_dir, smollm2_dir

ROWS = (("dense", "dense", "float32"), ("dense", "dense", "bfloat16"), ("dsf-0.5", "bitmask", "float16"))
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def dsf_directory(density: float = 0.5, seed: int = 0) -> Path:
    """Write (once, under ``$DSF_CACHE/bench``) SmolLM2 with random DSF factors in ``bitmask`` fp16."""
    from benchmarks.e2e_models import compressible_linears, random_dsf_factors
    from dsf_runtime import CompressedLayer, save_compressed
    from transformers import AutoModelForCausalLM

    directory = cache_dir() / "bench" / f"smollm2-dsf{density}-bitmask-fp16-seed{seed}"
    if (directory / "manifest.json").exists():
        return directory
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    names = compressible_linears(model)
    layers = {}
    for name in names:
        lin = model.get_submodule(name)
        A, B, _ = random_dsf_factors((lin.out_features, lin.in_features), density, torch.float32, "cpu", gen)
        layers[name] = CompressedLayer.from_dense("dsf", {"A": A, "B": B}, method="random-balanced",
                                                  bias=lin.bias, layout="bitmask", dtype=torch.float16)
    skip = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    tensors = {k: v for k, v in model.state_dict().items() if k not in skip}
    save_compressed(directory, tensors=tensors, layers=layers, config_source=smollm2_dir(),
                    info={"base_model": "SmolLM2-135M-Instruct (random DSF factors)",
                          "compression": {"density": density, "seed": seed}})
    return directory


def measure_row(model_name: str, layout: str, dtype: str, threads: int, new_tokens: int, directory: str) -> dict:
    """One row, in this process: load, generate, peak RSS."""
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if model_name == "dense":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=getattr(torch, dtype)).eval()
    else:
        from dsf_runtime import from_pretrained

        model = from_pretrained(directory)
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    from dsf_runtime.kernels import cpu

    return {"model": model_name, "layout": layout, "dtype": dtype, "batch": 1,
            "tok_s": (out.shape[1] - ids.shape[1]) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_s": load_s,
            "kernel": None if model_name == "dense" else (cpu.simd() or f"pure torch: {cpu.available()}")}


def machine(threads: int) -> str:
    """CPU model, cores, torch threads and version."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, {threads} torch threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON output (the parent run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--row", nargs=4, metavar=("MODEL", "LAYOUT", "DTYPE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(measure_row(*args.row[:3], args.threads, args.new_tokens, args.row[3])))
        return 0
    if args.out is None:
        parser.error("--out is required")
    directory = dsf_directory()
    rows = []
    for model_name, layout, dtype in ROWS:
        cmd = [sys.executable, "-m", "benchmarks.cpu_decode", "--threads", str(args.threads), "--new-tokens",
               str(args.new_tokens), "--row", model_name, layout, dtype, str(directory)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(args.threads), "new_tokens": args.new_tokens,
                                    "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
