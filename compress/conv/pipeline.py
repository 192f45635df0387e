"""Compress the convolutions of a CNN end to end: choose layers, calibrate, compress, (select by sensitivity),
(fine-tune), re-estimate batch norm, save.

    result = compress_cnn(model, CNNCompressConfig(method="dsf", density=0.25), calibration_batches)
    save_cnn("out/", result, base_model="fashion-cnn")
    # later: load_compressed_into(FashionCNN(), "out/")   (dsf_runtime.conv)

All Hessians come from one pass of the calibration batches through the dense model. The input model is not
modified; the result holds a compressed copy whose compressed convolutions are ``dsf_runtime.conv`` modules.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.conv.basis import SELECTIONS, basis_conv, basis_size_for_params
from compress.conv.bn import reestimate_bn
from compress.conv.calibration import collect_hessians
from compress.conv.dsf_conv import cnn_dsf_config, compress_conv
from compress.conv.finetune import finetune
from compress.conv.layers import conv_candidates
from compress.conv.metrics import kl_divergence, logits, output_positions
from compress.conv.sensitivity import Choice, measure_sensitivity, select_under_budget
from compress.solvers import METHODS as SOLVER_METHODS
from compress.solvers import make_config
from compress.solvers.base import check_density, layer_error
from dsf_runtime.checkpoint import save_compressed
from dsf_runtime.conv import CompressedConv, geometry_of, replace_conv

__all__ = ["CNN_METHODS", "CNNCompressConfig", "CNNCompressResult", "compress_cnn", "density_for_budget", "save_cnn"]

logger = logging.getLogger(__name__)

CNN_METHODS = ("dsf", "magnitude", "sparsegpt", "wanda", "basis")


@dataclass(frozen=True)
class CNNCompressConfig:
    """Options of ``compress_cnn``.

    Attributes:
        method: ``"dsf"`` (DSF-conv, CNN setting), ``"basis"`` (basis convolutions), or a single-matrix solver
            (``"magnitude"``, ``"sparsegpt"``, ``"wanda"``: kind ``single_conv``).
        density: kept fraction of each compressed conv's weights; for ``basis`` the weight budget
            ``p·in·kh·kw + (out − p)·p <= density·out·in·kh·kw`` fixes the basis size ``p``.
        layers: convolutions to compress; None = every supported conv with >= 4 input channels.
        budget: None, or a sensitivity-selected compression: the whole network's conv cost (all convs) must be at
            most ``budget`` times the dense one; ``density`` is then ignored and every candidate layer gets one of
            ``sensitivity_densities`` or stays dense.
        budget_metric: ``"params"`` (non-zero conv weights) or ``"macs"`` (conv multiply-accumulates).
        sensitivity_densities: the per-layer forms offered to the selection; with ``budget_metric="params"`` the
            uniform density that meets the budget (``density_for_budget``) is offered too when it lies in their
            range, so the selection can always do what converting every layer uniformly does.
        sensitivity_images: calibration images on which the sensitivity loss (KL to the dense model) is measured.
        data_aware: ``basis`` fits under the calibration Hessian (False: ``H = I``, data-free).
        selection: ``basis`` filter selection, ``"greedy"`` or ``"qr"``.
        dsf_options: overrides of ``CNN_DSF_OPTIONS`` for ``dsf`` (e.g. ``{"iters": 40}``).
        finetune_steps: distillation steps after compression (0 = none); finetune_lr: their Adam learning rate.
        bn_reestimate: re-estimate batch-norm statistics on the calibration batches at the end.
    """

    method: str
    density: float = 0.25
    layers: tuple[str, ...] | None = None
    budget: float | None = None
    budget_metric: str = "params"
    sensitivity_densities: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75)
    sensitivity_images: int = 512
    data_aware: bool = True
    selection: str = "greedy"
    dsf_options: Mapping[str, Any] = field(default_factory=dict)
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    bn_reestimate: bool = True

    def __post_init__(self) -> None:
        if self.method not in CNN_METHODS:
            raise ValueError(f"method must be one of {CNN_METHODS}, got {self.method!r}")
        check_density(self.density)
        for d in self.sensitivity_densities:
            check_density(d)
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(
                f"budget must be in (0, 1] (a fraction of the dense conv cost) or None, got {self.budget!r}"
            )
        if self.budget_metric not in ("params", "macs"):
            raise ValueError(f"budget_metric must be 'params' or 'macs', got {self.budget_metric!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.finetune_steps < 0 or self.sensitivity_images < 1:
            raise ValueError("finetune_steps must be >= 0 and sensitivity_images >= 1")
        if self.method != "dsf" and self.dsf_options:
            raise ValueError(f"dsf_options apply to method 'dsf' only, got method {self.method!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dsf_options"] = dict(self.dsf_options)
        return data


@dataclass
class CNNCompressResult:
    """What ``compress_cnn`` returns.

    Attributes:
        model: the compressed copy (eval mode).
        layers: its compressed convolutions by module name.
        config: the options used.
        report: per compressed layer ``{kind, method, shape, nnz, density, error, relative_error, choice}``.
    """

    model: nn.Module
    layers: dict[str, CompressedConv]
    config: CNNCompressConfig
    report: dict[str, dict[str, Any]]


def _compress_layer(module: nn.Conv2d, hessian: torch.Tensor, config: CNNCompressConfig, density: float,
                    name: str) -> CompressedConv:
    if config.method == "basis":
        geometry = geometry_of(module, name)
        n_basis = basis_size_for_params(geometry, int(density * geometry.out_channels * geometry.fan_in), name)
        return basis_conv(module, n_basis, hessian if config.data_aware else None, selection=config.selection,
                          name=name)
    if config.method == "dsf":
        return compress_conv(module, hessian, cnn_dsf_config(density, **config.dsf_options), name=name)
    assert config.method in SOLVER_METHODS
    return compress_conv(module, hessian, make_config(config.method, density), name=name)


def _dense_costs(model: nn.Module, positions: Mapping[str, int], metric: str) -> dict[str, int]:
    """Cost of every ``Conv2d`` of the (dense) model."""
    costs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            weights = int(torch.count_nonzero(module.weight))
            costs[name] = weights * (positions[name] if metric == "macs" else 1)
    return costs


def _label(conv: CompressedConv) -> str:
    """``"basis 13/64"`` (basis filters of output channels) or ``"dsf density 0.25"``."""
    layer = conv.layer
    if layer.kind == "basis_conv":
        return f"basis {layer.inner_dim}/{layer.shape[0]}"
    return f"{layer.method} density {layer.nnz / (layer.shape[0] * layer.shape[1]):.3g}"


def _select(model: nn.Module, candidates: Mapping[str, nn.Conv2d], hessians: Mapping[str, torch.Tensor],
            config: CNNCompressConfig, images: torch.Tensor) -> tuple[dict[str, CompressedConv], dict[str, str]]:
    """Sensitivity-based selection: compress every candidate at every offered density, measure, pick."""
    assert config.budget is not None
    positions = output_positions(model, images[:1])
    dense = _dense_costs(model, positions, config.budget_metric)
    scale = {name: positions[name] if config.budget_metric == "macs" else 1 for name in candidates}
    densities = set(config.sensitivity_densities)
    uniform = _uniform_density(model, config.budget, candidates)[0]
    if config.budget_metric == "params" and min(densities) < uniform < max(densities):
        densities.add(uniform)  # so the selection can always do what converting every layer uniformly does
    options = {name: [_compress_layer(module, hessians[name], config, d, name) for d in sorted(densities)]
               for name, module in candidates.items()}
    reference = logits(model, images)
    increases = measure_sensitivity(model, options, lambda m: kl_divergence(reference, logits(m, images)))
    choices = {
        name: [Choice("dense", dense[name], 0.0)]
        + [Choice(_label(form), form.layer.nnz * scale[name], inc, form)
           for form, inc in zip(options[name], increases[name], strict=True)]
        for name in candidates
    }
    fixed = sum(cost for name, cost in dense.items() if name not in candidates)
    budget = int(config.budget * sum(dense.values()))
    chosen = select_under_budget(choices, budget, fixed_cost=fixed)
    logger.info("selected under %s budget %d: %s", config.budget_metric, budget,
                {name: c.label for name, c in chosen.items()})
    layers = {name: c.layer for name, c in chosen.items() if c.layer is not None}
    return layers, {name: c.label for name, c in chosen.items()}


def compress_cnn(model: nn.Module, config: CNNCompressConfig, calibration: Sequence[torch.Tensor]) -> CNNCompressResult:
    """Compress ``model``'s convolutions.

    Args:
        model: a dense CNN (not modified).
        config: the options.
        calibration: input batches ``[B, C, H, W]``: Hessians, sensitivity, fine-tuning and BN re-estimation.

    Returns:
        A ``CNNCompressResult`` with the compressed copy.

    Raises:
        ValueError: for unsupported requested layers, an impossible budget or basis size, or bad options, each
            naming the layer.
    """
    if not calibration:
        raise ValueError("compress_cnn needs at least one calibration batch")
    dense = copy.deepcopy(model).eval()
    work = copy.deepcopy(model).eval()
    candidates = conv_candidates(work, config.layers)
    hessians = collect_hessians(work, candidates, calibration)
    labels: dict[str, str] = {}
    if config.budget is None:
        layers = {}
        for name, module in candidates.items():
            start = time.perf_counter()
            layers[name] = _compress_layer(module, hessians[name], config, config.density, name)
            done = layers[name].layer
            logger.info("compressed %r (%s, %d weights kept, relative error %.4g) in %.1f s", name,
                        done.kind, done.nnz, done.relative_error or 0.0, time.perf_counter() - start)
    else:
        images = torch.cat(list(calibration))[: config.sensitivity_images]
        layers, labels = _select(work, candidates, hessians, config, images)
    originals = {name: candidates[name].weight.detach().reshape(candidates[name].out_channels, -1) for name in layers}
    replace_conv(work, layers)
    if config.finetune_steps and layers:
        layers = finetune(work, dense, layers, calibration, steps=config.finetune_steps, lr=config.finetune_lr)
        for name, conv in layers.items():
            conv.layer.error, conv.layer.relative_error = layer_error(originals[name], conv.weight(), hessians[name])
    if config.bn_reestimate:
        reestimate_bn(work, calibration)
    report = {}
    for name, conv in layers.items():
        layer = conv.layer
        report[name] = {
            "kind": layer.kind, "method": layer.method, "shape": list(layer.shape), "nnz": layer.nnz,
            "density": layer.nnz / (layer.shape[0] * layer.shape[1]), "error": layer.error,
            "relative_error": layer.relative_error, "choice": labels.get(name),
        }
    return CNNCompressResult(work.eval(), layers, config, report)


def density_for_budget(model: nn.Module, budget: float, layers: Sequence[str] | None = None) -> float:
    """The uniform per-layer density of the candidate convs that brings the whole network's non-zero conv
    weights to ``budget`` times the dense count (the others stay dense).

    Raises:
        ValueError: the convs that stay dense alone exceed the budget.
    """
    candidates = conv_candidates(model, layers)
    density, fixed, total = _uniform_density(model, budget, candidates)
    if density <= 0:
        raise ValueError(
            f"a conv-weight budget of {budget:g}× cannot be met: the convs that stay dense hold {fixed:,} of "
            f"{total:,} weights; raise the budget"
        )
    return min(1.0, density)


def _uniform_density(model: nn.Module, budget: float, candidates: Mapping[str, nn.Conv2d]) -> tuple[float, int, int]:
    """``(density, weights of the convs that stay dense, all conv weights)`` for ``density_for_budget``."""
    total = {name: module.weight.numel() for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    fixed = sum(n for name, n in total.items() if name not in candidates)
    movable = sum(total[name] for name in candidates)
    return (budget * sum(total.values()) - fixed) / movable, fixed, sum(total.values())


def save_cnn(directory: str | os.PathLike[str], result: CNNCompressResult, *, base_model: str) -> Path:
    """Write the compressed model as a compressed directory (docs/format.md, "Convolution layers"): the
    compressed convolutions as layers, every other parameter and buffer (BN statistics included) as tensors.

    Returns:
        ``directory`` as a Path.
    """
    names = set(result.layers)

    def owned(key: str) -> bool:
        return any(key.startswith(name + ".") for name in names)

    tensors = {k: v for k, v in result.model.state_dict().items() if not owned(k)}
    architecture = type(result.model).__name__
    return save_compressed(
        directory, tensors=tensors, layers={name: conv.to_layer() for name, conv in result.layers.items()},
        config_source={"architectures": [architecture], "dsf_base_model": base_model},
        info={"base_model": base_model, "architecture": architecture, "compression": result.config.to_json()},
    )
