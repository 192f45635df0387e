"""How much GPU memory does loading a compressed model take, against the loaded model itself?

A LLaMA-2-7B-shaped model with random balanced DSF factors (density 0.5, fp16) is written as a compressed
directory in each layout asked for, then loaded with ``from_pretrained(device="cuda")``. For each layout: the peak
allocated CUDA memory during the load, the memory the loaded model holds, and its largest compressed layer. The
issue's bound is ``peak <= loaded + one layer``: a directory stored in ``nibble`` is read as stored, a ``bitmask``
one is converted layer by layer (one dense temporary of a factor at a time).

    python -m benchmarks.load_memory --out benchmarks/results/load-memory-h100.json
    TRITON_INTERPRET=1 python -m benchmarks.load_memory --cpu-dry-run --out /tmp/x.json   # code paths only
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import run_meta
from benchmarks.e2e_models import LLAMA2_7B, TINY_LLAMA, build_random_llama, compress_to_directory
from dsf_runtime import FactorizedLinear, SparseLinear, from_pretrained


def _layer_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def measure_load(directory: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak and resident CUDA bytes of ``from_pretrained(directory)`` (None for both on the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model = from_pretrained(directory, device=device, dtype=dtype)
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, (FactorizedLinear, SparseLinear))]
    row = {"load_s": seconds, "largest_layer_bytes": max(_layer_bytes(m) for m in layers),
           "layouts": sorted({f.layout for m in layers for f in m.factors()}),
           "model_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])}
    if cuda:
        torch.cuda.synchronize(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        row["resident_bytes"] = torch.cuda.memory_allocated(device) - base
        row["within_bound"] = row["peak_bytes"] <= row["resident_bytes"] + row["largest_layer_bytes"]
    del model
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    parser.add_argument("--layouts", default="nibble,bitmask", help="comma-separated stored layouts to load")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=None, help="where the directories are written (temp)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on the CPU: code paths only")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    dtype = torch.float16
    shape = TINY_LLAMA if args.cpu_dry_run else LLAMA2_7B
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dsf-load-memory-"))
    results = {"meta": run_meta(device, method="from_pretrained peak vs resident CUDA memory"),
               "model": "llama2-7b-shaped" if not args.cpu_dry_run else "tiny-llama (dry run)",
               "density": args.density, "dry_run": args.cpu_dry_run, "rows": []}
    dense = build_random_llama(shape, device, dtype)
    config = dense.config.to_dict()
    directories = {}
    for layout in args.layouts.split(","):
        directories[layout] = workdir / layout
        compress_to_directory(dense, args.density, directories[layout], config, layout=layout)
        print(f"wrote {layout} directory", flush=True)
    del dense
    for layout, directory in directories.items():
        row = {"stored_layout": layout, **measure_load(directory, device, dtype)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(directory, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
