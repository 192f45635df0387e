"""``dsf compress-cnn``: compress a packaged CNN's convolutions (``compress.conv``), save it as a compressed
directory, optionally export ONNX, and report accuracy (or agreement), parameters and MACs before and after."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from dsf_cli.common import fail

__all__ = ["register"]


class Network(str, Enum):
    mnist = "mnist"
    fashion = "fashion"
    efficientnet_lite0 = "efficientnet-lite0"


class Method(str, Enum):
    dsf = "dsf"
    magnitude = "magnitude"
    sparsegpt = "sparsegpt"
    wanda = "wanda"
    basis = "basis"


class Metric(str, Enum):
    params = "params"
    macs = "macs"


class Selection(str, Enum):
    greedy = "greedy"
    qr = "qr"


def compress_cnn(
    network: Network = typer.Option(Network.mnist, "--network", help="Packaged CNN and its data."),
    method: Method = typer.Option(Method.dsf, "--method", help="dsf (DSF-conv), basis, or a single-sparse method."),
    density: float = typer.Option(
        0.25, "--density", help="Kept fraction of each compressed conv's weights (basis: its weight budget)."
    ),
    budget: float | None = typer.Option(
        None, "--budget", help="Sensitivity selection: the network's conv cost must be <= this fraction of dense."
    ),
    budget_metric: Metric = typer.Option(Metric.params, "--budget-metric", help="What --budget limits."),
    layers: str | None = typer.Option(
        None, "--layers", help="Comma-separated conv names; default: every groups=1 conv with >= 4 input channels."
    ),
    calibration_images: int = typer.Option(512, "--calibration-images", min=1, help="Calibration images."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per calibration batch."),
    iters: int | None = typer.Option(None, "--iters", help="DSF: outer iterations (CNN setting: 200)."),
    selection: Selection = typer.Option(Selection.greedy, "--selection", help="Basis filter selection."),
    data_free: bool = typer.Option(False, "--data-free", help="Basis: fit with H = I instead of the calibration H."),
    finetune_steps: int = typer.Option(0, "--finetune-steps", min=0, help="Distillation steps after compression."),
    finetune_lr: float = typer.Option(1e-4, "--finetune-lr", help="Adam learning rate of the fine-tuning."),
    bn: bool = typer.Option(True, "--bn/--no-bn", help="Re-estimate batch-norm statistics after compression."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    output: Path = typer.Option(..., "--output", "-o", help="Output compressed directory.", file_okay=False),
    onnx: Path | None = typer.Option(None, "--onnx", help="Also export ONNX (standard ops) to this file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --onnx file."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Report accuracy/agreement and cost."),
    eval_images: int = typer.Option(0, "--eval-images", min=0, help="Evaluate on the first N images (0 = all)."),
) -> None:
    """Compress a packaged CNN (MNIST, Fashion-MNIST, EfficientNet-Lite0) and write a compressed directory.

    The fashion network is trained on first use (a few minutes on CPU) and cached under $DSF_CACHE.
    Reload the result with dsf_runtime.conv.load_compressed_into.

    Examples:

        dsf compress-cnn --network mnist --method dsf --density 0.25 -o runs/mnist-dsf25

        dsf compress-cnn --network fashion --method basis --density 0.25 -o runs/fashion-basis --onnx fb.onnx
    """
    import torch

    from compress.conv import CNNCompressConfig, save_cnn
    from compress.conv import compress_cnn as run
    from compress.conv.data import batches
    from compress.conv.metrics import evaluate as score
    from compress.conv.metrics import logits, model_cost
    from compress.conv.networks import load_network

    try:
        config = CNNCompressConfig(
            method=method.value, density=density, budget=budget, budget_metric=budget_metric.value,
            layers=tuple(n.strip() for n in layers.split(",") if n.strip()) if layers else None,
            data_aware=not data_free, selection=selection.value,
            dsf_options={"iters": iters} if iters is not None and method is Method.dsf else {},
            finetune_steps=finetune_steps, finetune_lr=finetune_lr, bn_reestimate=bn,
        )
        net = load_network(network.value, calibration_images=calibration_images, seed=seed)
        result = run(net.model, config, batches(net.calibration, batch_size))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise fail(str(exc)) from exc
    save_cnn(output, result, base_model=net.base_model)
    typer.echo(f"wrote {output}: {len(result.layers)} compressed conv(s)")
    if onnx is not None:
        from exporters.onnx_cnn import export_cnn_onnx

        try:
            export_cnn_onnx(result.model, onnx, net.calibration[:2], overwrite=overwrite)
        except FileExistsError as exc:
            raise fail(str(exc)) from exc
        typer.echo(f"wrote {onnx}")
    if evaluate:
        images = net.eval_images[: eval_images or None]
        labels = None if net.eval_labels is None else net.eval_labels[: eval_images or None]
        with torch.no_grad():
            reference = logits(net.model, images)
        summary = {}
        for label, model in (("dense", net.model), ("compressed", result.model)):
            quality = score(model, images, labels=labels, reference=reference)
            summary[label] = {**quality, **model_cost(model, images[:1]).to_json()}
        typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    """Add ``compress-cnn`` to the ``dsf`` command."""
    app.command("compress-cnn")(compress_cnn)
