"""Does I-OBS beat SparseGPT on SmolLM2-135M at equal non-zeros, layer by layer and in perplexity?

For each density (default 0.5), three runs on the whole packaged SmolLM2-135M-Instruct with the settings of
``benchmarks/quality_smollm2.py`` (calibration: Emma, 64 random windows of 512 tokens, seed 0; evaluation:
Persuasion, first 32 non-overlapping windows of 1024 tokens, no BOS):

* ``sparsegpt``: the one-shot baseline (``compress.api.compress_model``);
* ``iobs``: layer-wise I-OBS (``compress_model`` with method ``iobs``, ``--iobs-iters`` iterations);
* ``iobs-model``: model-level I-OBS (``compress.iobs_model.compress_iobs_model``): ``--rounds`` rounds of
  calibration-gradient steps re-projected by SparseGPT, the round kept by perplexity on a held-out text
  (default Northanger Abbey, 8 windows of 512 tokens; neither the calibration nor the evaluation text).

Full run (the lead runs it; on a GPU preferably)::

    python benchmarks/iobs_smollm2.py --device auto

Smoke run on a truncated model (2 blocks, small calibration, a few windows; writes to /tmp)::

    python benchmarks/iobs_smollm2.py --blocks 2 --samples 4 --seqlen 64 --max-windows 2 --eval-seqlen 256 \\
        --rounds 2 --iobs-iters 2 --heldout-windows 2 --heldout-seqlen 128 --out-dir /tmp/iobs-smoke

``--methods`` runs a subset (the layer comparison needs ``sparsegpt``).

Outputs (atomic writes after every density; a density already in the details file is skipped):

* ``<out-dir>/quality-smollm2.json`` (shared with ``quality_smollm2.py``; its settings must match, other runs are
  kept): runs ``{"method": "iobs" | "iobs-model", "density", "perplexity", "total_nnz", "seconds", "device"}``;
* ``<out-dir>/iobs-smollm2.json``: per density, per method ``{perplexity, total_nnz, seconds,
  mean_relative_error}``, the model-level rounds (held-out perplexity, calibration loss, step size, seconds)
  and every layer's relative error per method, with how often each I-OBS variant beats SparseGPT (all layers,
  and block 0, where SparseGPT and layer-wise I-OBS see the same H). Layer errors of ``sparsegpt``/``iobs`` use
  the H of the sequential pass; those of ``iobs-model`` the H of the kept model's own activations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_smollm2 import add_run_arguments, device_name, load_smollm2  # noqa: E402
from compress.api import CompressConfig, compress_model, resolve_device  # noqa: E402
from compress.assets import PACKAGED_MODEL  # noqa: E402
from compress.data import load_evaluation  # noqa: E402
from compress.evaluate import perplexity  # noqa: E402
from compress.iobs_model import IOBSModelConfig, compress_iobs_model  # noqa: E402
from compress.output import write_json_atomic  # noqa: E402

logger = logging.getLogger("iobs_smollm2")

QUALITY = "quality-smollm2.json"
DETAILS = "iobs-smollm2.json"
METHODS = ("sparsegpt", "iobs", "iobs-model")
# Settings that must match ``quality_smollm2.py``'s for runs to share its results file (``dsf_iters`` aside).
_QUALITY_SETTINGS = ("model", "calibration", "calibration_samples", "calibration_seqlen", "seed", "eval_text",
                     "seqlen", "windows", "blocks")
_QUALITY_DSF_ITERS = 40  # quality_smollm2.py's default, recorded when this script creates the file


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--densities", default="0.5", help="comma-separated densities in (0, 1]")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (layer comparisons need sparsegpt)")
    p.add_argument("--rounds", type=int, default=IOBSModelConfig.rounds, help="model-level I-OBS rounds")
    p.add_argument("--step", type=float, default=IOBSModelConfig.step, help="model-level step size η")
    p.add_argument("--iobs-iters", type=int, default=5, help="layer-wise I-OBS iterations")
    add_run_arguments(p, runs_dir=Path("runs/iobs-smollm2"))
    p.add_argument("--heldout", default=IOBSModelConfig.heldout, help="held-out text of the model-level rounds")
    p.add_argument("--heldout-seqlen", type=int, default=IOBSModelConfig.heldout_seqlen,
                   help="tokens per held-out window")
    p.add_argument("--heldout-windows", type=int, default=IOBSModelConfig.heldout_windows,
                   help="held-out windows from the start (0 = all)")
    return p.parse_args(argv)


def _run(method: str, density: float, args: argparse.Namespace, device: torch.device,
         windows: torch.Tensor) -> dict[str, Any]:
    """Compress a fresh model with one method; returns its record, layer errors and (model-level) rounds."""
    config = CompressConfig(
        model=PACKAGED_MODEL, method="iobs" if method == "iobs" else "sparsegpt", density=density,
        solver_options={"iters": args.iobs_iters} if method == "iobs" else {}, calibration=args.calibration,
        samples=args.samples, seqlen=args.seqlen, seed=args.seed, device=str(device),
    )
    model, tokenizer = load_smollm2(args.blocks)
    out = args.runs_dir / f"{method}-{density:g}"
    start = time.perf_counter()
    if method == "iobs-model":
        iobs = IOBSModelConfig(rounds=args.rounds, step=args.step, heldout=args.heldout,
                               heldout_seqlen=args.heldout_seqlen, heldout_windows=args.heldout_windows)
        report = compress_iobs_model(config, out, iobs, overwrite=True, model=model, tokenizer=tokenizer)
    else:
        report = compress_model(config, out, overwrite=True, model=model, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    ppl = perplexity(model.to(device), windows).perplexity
    if not args.keep_outputs:
        shutil.rmtree(out)
    summary = report["layer_errors"]["summary"]
    logger.info("%s at density %g: perplexity %.4f, %.0f s", method, density, ppl, seconds)
    return {
        "record": {"method": method, "density": density, "perplexity": ppl, "total_nnz": summary["total_nnz"],
                   "seconds": seconds, "device": device_name(device)},
        "mean_relative_error": summary["mean_relative_error"],
        "layers": {row["name"]: (row["shape"], row["relative_error"]) for row in report["layer_errors"]["layers"]},
        "rounds": report.get("iobs_rounds"),
    }


def _beats(layers: list[dict[str, Any]], method: str, block0: bool) -> dict[str, Any]:
    rows = [r for r in layers if not block0 or ".layers.0." in r["name"]]
    wins = sum(r["relative_error"][method] < r["relative_error"]["sparsegpt"] for r in rows)
    ratios = sorted(r["relative_error"][method] / r["relative_error"]["sparsegpt"] for r in rows)
    return {"layers": len(rows), "lower_than_sparsegpt": wins,
            "median_ratio_to_sparsegpt": ratios[len(ratios) // 2] if ratios else None}


def _details_entry(density: float, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    first = next(iter(runs.values()))
    layers = [{"name": n, "shape": shape, "relative_error": {m: run["layers"][n][1] for m, run in runs.items()}}
              for n, (shape, _) in first["layers"].items()]
    entry = {
        "density": density,
        "methods": {m: {**{k: run["record"][k] for k in ("perplexity", "total_nnz", "seconds")},
                        "mean_relative_error": run["mean_relative_error"]} for m, run in runs.items()},
        "layers": layers,
    }
    if "iobs-model" in runs:
        entry["iobs_model_rounds"] = runs["iobs-model"]["rounds"]
    if "sparsegpt" in runs:
        entry["summary"] = {m: {"all_blocks": _beats(layers, m, False), "block_0": _beats(layers, m, True)}
                            for m in ("iobs", "iobs-model") if m in runs}
    return entry


def _append_quality(path: Path, settings: dict[str, Any], dense: float, records: list[dict[str, Any]]) -> None:
    """Add (or replace) runs in the shared quality file, keeping every other run; refuses other settings."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if data is None:
        data = {**settings, "dsf_iters": _QUALITY_DSF_ITERS, "dense_perplexity": dense, "runs": []}
    differ = [k for k in _QUALITY_SETTINGS if data.get(k) != settings.get(k)]
    if differ:
        raise SystemExit(
            f"{path} holds results made with other settings ({', '.join(f'{k}: {data.get(k)!r}' for k in differ)}); "
            "pass another --out-dir or the same settings"
        )
    keys = {(r["method"], r["density"]) for r in records}
    data["runs"] = [r for r in data["runs"] if (r["method"], r["density"]) not in keys] + records
    write_json_atomic(path, data)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[iobs] %(message)s")
    args = _args(argv)
    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(METHODS)}")
    device = resolve_device(args.device)
    model, tokenizer = load_smollm2(args.blocks)
    settings = {
        "model": PACKAGED_MODEL + (f" (first {args.blocks} blocks)" if args.blocks else ""),
        "calibration": args.calibration, "calibration_samples": args.samples, "calibration_seqlen": args.seqlen,
        "seed": args.seed, "eval_text": args.eval_text, "seqlen": args.eval_seqlen, "windows": args.max_windows,
        "blocks": args.blocks or model.config.num_hidden_layers,
    }
    windows = load_evaluation(tokenizer, args.eval_text, args.eval_seqlen, args.max_windows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    details_path = args.out_dir / DETAILS
    details = json.loads(details_path.read_text(encoding="utf-8")) if details_path.exists() else None
    if details is not None and any(details.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"{details_path} holds results made with other settings; pass another --out-dir")
    if details is None:
        details = {**settings, "dense_perplexity": perplexity(model.to(device), windows).perplexity, "densities": []}
    del model
    details.update(rounds=args.rounds, step=args.step, iobs_iters=args.iobs_iters, heldout=args.heldout,
                   heldout_seqlen=args.heldout_seqlen, heldout_windows=args.heldout_windows, torch=torch.__version__)
    for density in densities:
        if any(entry["density"] == density for entry in details["densities"]):
            logger.info("skip density %g: already in %s", density, details_path)
            continue
        runs = {method: _run(method, density, args, device, windows) for method in METHODS if method in methods}
        _append_quality(args.out_dir / QUALITY, settings, details["dense_perplexity"],
                        [runs[m]["record"] for m in ("iobs", "iobs-model") if m in runs])
        details["densities"].append(_details_entry(density, runs))
        details["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json_atomic(details_path, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
