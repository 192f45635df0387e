"""How much perplexity does each method lose on SmolLM2-135M at 50/40/30% density, and which has the smallest
layer errors?

For the dense model and each (method, density) run: compress the whole packaged SmolLM2-135M-Instruct
(``compress.api.compress_model``; calibration: one Austen novel, default Emma, 64 random windows of 512 tokens,
seed 0), then measure perplexity on Persuasion with the documented windows (``compress.evaluate``: first 32
non-overlapping windows of 1024 tokens, no BOS). Perplexity is that of the compressed model in memory, whose
weights are the dense products ``A·B`` (as the DSF reference evaluates); the compressed directory itself is
deleted after each run unless ``--keep-outputs``.

Full sweep (the lead runs it; hours on a 2-core CPU)::

    python benchmarks/quality_smollm2.py --device auto

Smoke run on a truncated model (2 blocks, small calibration, a few windows)::

    python benchmarks/quality_smollm2.py --blocks 2 --samples 4 --seqlen 64 --max-windows 2 \\
        --methods magnitude,wanda --densities 0.5 --dsf-iters 1 --out-dir /tmp/quality-smoke

Method ``dsf-g16`` (not in the default sweep) is DSF with balanced factors (``group_size=16``, the GPU kernels'
``nibble`` layout; total density slightly below the target), to measure what the balance costs.

Outputs (written atomically after every run; runs already in the file are skipped, so an interrupted sweep
continues where it stopped, and an interrupted run resumes from its last finished block):

* ``<out-dir>/quality-smollm2.json``: ``{"model", "calibration", "eval_text", "seqlen", "dense_perplexity",
  "runs": [{"method", "density", "perplexity", "total_nnz", "seconds", "device"}], ...settings}``; ``seconds`` is
  the compression wall time of the run, ``seqlen`` the evaluation window;
* ``<out-dir>/layer-errors-smollm2.json``: at density 0.5, the relative error of every linear layer per method and
  how often ``dsf < sparsegpt < wanda < magnitude`` holds (all four, and each adjacent pair). Each method's block
  ``i`` sees the inputs of its own compressed blocks ``0..i-1``, so only block 0 compares on identical H.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.api import CompressConfig, compress_model, resolve_device  # noqa: E402
from compress.architectures import truncate_blocks  # noqa: E402
from compress.assets import PACKAGED_MODEL, smollm2_dir  # noqa: E402
from compress.data import load_evaluation  # noqa: E402
from compress.evaluate import perplexity  # noqa: E402
from compress.output import write_json_atomic  # noqa: E402

logger = logging.getLogger("quality_smollm2")

ORDER = ("dsf", "sparsegpt", "wanda", "magnitude")  # the expected ordering of layer errors, smallest first
# Method name in the results -> (solver, its options). "dsf-g16" is DSF with balanced factors (16 columns per group,
# the GPU kernels' nibble layout), to measure what the balance costs next to unstructured DSF.
VARIANTS = {m: (m, {}) for m in ORDER} | {"dsf-g16": ("dsf", {"group_size": 16})}
METHODS = tuple(VARIANTS)
RESULTS = "quality-smollm2.json"
LAYER_ERRORS = "layer-errors-smollm2.json"
# Settings that must match for runs to share one results file.
_SETTINGS = ("model", "calibration", "calibration_samples", "calibration_seqlen", "seed", "eval_text", "seqlen",
             "windows", "blocks", "dsf_iters")


def add_run_arguments(p: argparse.ArgumentParser, runs_dir: Path) -> None:
    """The options every SmolLM2 quality script shares: where results and runs go, calibration and evaluation."""
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="where the two JSON files go")
    p.add_argument("--runs-dir", type=Path, default=runs_dir,
                   help="compressed outputs (git-ignored); a run's directory is removed when it is done")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's compressed model directory")
    p.add_argument("--calibration", default="emma", help="calibration text (packaged name or file)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--eval-text", default="persuasion", help="evaluation text (packaged name or file)")
    p.add_argument("--eval-seqlen", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--max-windows", type=int, default=32, help="evaluation windows from the start (0 = all)")
    p.add_argument("--blocks", type=int, default=0, help="smoke runs: keep only the first N decoder blocks (0 = all)")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--methods", default=",".join(ORDER), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--densities", default="0.5,0.4,0.3", help="comma-separated densities in (0, 1]")
    add_run_arguments(p, runs_dir=Path("runs/quality-smollm2"))
    p.add_argument("--dsf-iters", type=int, default=40, help="DSF outer iterations (40 = the reference)")
    return p.parse_args(argv)


def load_smollm2(blocks: int = 0):
    """The packaged SmolLM2-135M (fp32, eval mode; only its first ``blocks`` decoder blocks when > 0) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    if blocks:
        truncate_blocks(model, blocks)
    return model, AutoTokenizer.from_pretrained(smollm2_dir())


def device_name(device: torch.device) -> str:
    """What the results record as the device: the GPU's name, or the CPU and its torch thread count."""
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _read(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Existing results made with the same settings, None when there are none; refuses other settings."""
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    differ = [k for k in _SETTINGS if data.get(k) != settings.get(k)]
    if differ:
        raise SystemExit(
            f"{path} holds results made with other settings "
            f"({'; '.join(f'{k}: {data.get(k)!r} there, {settings.get(k)!r} now' for k in differ)}); "
            "pass another --out-dir or the same settings"
        )
    return data


def _order_summary(errors: dict[str, dict[str, float]], names: list[str]) -> dict[str, Any]:
    """How often the expected ordering holds over the layers where all of its methods were run."""
    present = [m for m in ORDER if m in errors]
    rows = [[errors[m][n] for m in present] for n in names if all(n in errors[m] for m in present)]
    pairs = {
        f"{a}<{b}": sum(r[i] < r[i + 1] for r in rows) for i, (a, b) in enumerate(zip(present, present[1:]))
    }
    full = sum(all(r[i] < r[i + 1] for i in range(len(r) - 1)) for r in rows)
    return {
        "order": " < ".join(present),
        "layers": len(rows),
        "full_order_holds": full,
        "full_order_fraction": full / len(rows) if rows else None,
        "adjacent_pairs_hold": pairs,
    }


def _layer_errors_file(path: Path, settings: dict[str, Any], method: str, report: dict[str, Any]) -> None:
    """Add one density-0.5 run's per-layer relative errors to the layer-errors file and refresh its summary."""
    data = _read(path, settings) or {**settings, "density": 0.5, "layers": []}
    rows = {row["name"]: row for row in data["layers"]}
    for layer in report["layer_errors"]["layers"]:
        row = rows.setdefault(layer["name"], {"name": layer["name"], "shape": layer["shape"], "relative_error": {}})
        row["relative_error"][method] = layer["relative_error"]
    data["layers"] = list(rows.values())
    errors: dict[str, dict[str, float]] = {}
    for row in data["layers"]:
        for m, value in row["relative_error"].items():
            errors.setdefault(m, {})[row["name"]] = value
    names = [row["name"] for row in data["layers"]]
    data["summary"] = {
        "all_blocks": _order_summary(errors, names),
        "block_0": _order_summary(errors, [n for n in names if ".layers.0." in n]),
    }
    data["note"] = "block i of each method sees its own compressed blocks' outputs; only block 0 shares H"
    write_json_atomic(path, data)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[quality] %(message)s")
    args = _args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    device = resolve_device(args.device)
    model, tokenizer = load_smollm2(args.blocks)
    settings = {
        "model": PACKAGED_MODEL + (f" (first {args.blocks} blocks)" if args.blocks else ""),
        "calibration": args.calibration,
        "calibration_samples": args.samples,
        "calibration_seqlen": args.seqlen,
        "seed": args.seed,
        "eval_text": args.eval_text,
        "seqlen": args.eval_seqlen,
        "windows": args.max_windows,
        "blocks": args.blocks or model.config.num_hidden_layers,
        "dsf_iters": args.dsf_iters,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.out_dir / RESULTS
    results = _read(results_path, settings) or {**settings, "dense_perplexity": None, "runs": []}
    windows = load_evaluation(tokenizer, args.eval_text, args.eval_seqlen, args.max_windows)
    if results["dense_perplexity"] is None:
        results["dense_perplexity"] = perplexity(model.to(device), windows).perplexity
        model.to("cpu")
        logger.info("dense perplexity %.4f", results["dense_perplexity"])
    results.update(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                   windows_evaluated=int(windows.shape[0]))
    write_json_atomic(results_path, results)
    del model

    done = {(r["method"], r["density"]) for r in results["runs"]}
    for density in densities:
        for method in methods:
            if (method, density) in done:
                logger.info("skip %s at density %g: already in %s", method, density, results_path)
                continue
            solver, options = VARIANTS[method]
            options = {**options, "iters": args.dsf_iters} if solver == "dsf" else options
            config = CompressConfig(
                model=settings["model"], method=solver, density=density, solver_options=options,
                calibration=args.calibration, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                device=str(device),
            )
            model, tokenizer = load_smollm2(args.blocks)
            out = args.runs_dir / f"{method}-{density:g}"
            start = time.perf_counter()
            finished = (out / "dsf_manifest.json").exists()  # kept from a run whose record was not written
            report = compress_model(
                config, out, resume=True, overwrite=finished, progress=False, model=model, tokenizer=tokenizer
            )
            seconds = time.perf_counter() - start
            ppl = perplexity(model.to(device), windows).perplexity
            results["runs"].append({
                "method": method,
                "density": density,
                "perplexity": ppl,
                "total_nnz": report["layer_errors"]["summary"]["total_nnz"],
                "seconds": seconds,
                "device": device_name(device),
            })
            write_json_atomic(results_path, results)
            if density == 0.5:
                _layer_errors_file(args.out_dir / LAYER_ERRORS, settings, method, report)
            if not args.keep_outputs:
                shutil.rmtree(out)
            logger.info("%s at density %g: perplexity %.4f (dense %.4f), %.0f s", method, density, ppl,
                        results["dense_perplexity"], seconds)
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
