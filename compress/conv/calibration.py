"""Calibration Hessians of convolutions from unfolded inputs.

For a convolution with geometry ``g`` the layer is a linear map of the unfolded input patches: with
``P = unfold(pad(x))`` ``[N, L, in·kh·kw]`` (``L`` output positions), ``y = P·Wᵀ`` for the flattened weight
``W`` ``[out, in·kh·kw]``. So the layer error of a compressed weight is ``tr(ΔW·H·ΔWᵀ)`` with
``H = (2/N)·Σ_images Σ_positions p·pᵀ``, accumulated by ``compress.hessian.HessianAccumulator`` (one sample per
image, as SparseGPT does for convs). All Hessians come from one pass over the dense model (the DSF/OBC CNN
experiments calibrate every layer on the dense network's activations).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compress.hessian import HessianAccumulator
from dsf_runtime.conv import ConvGeometry, geometry_of

__all__ = ["collect_hessians", "unfold_input"]

logger = logging.getLogger(__name__)


def unfold_input(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """The patches a convolution multiplies with its flattened weight.

    Args:
        x: ``[N, in, H, W]`` input of the convolution (before its padding).
        geometry: the convolution's geometry.

    Returns:
        ``[N, L, in·kh·kw]`` with ``L = H'·W'`` output positions, columns in ``(in, kh, kw)`` order, so that
        ``patches @ weight.reshape(out, -1).T`` equals the convolution output (without bias) reshaped.
    """
    top, left, bottom, right = geometry.padding
    padded = F.pad(x, (left, right, top, bottom)) if any(geometry.padding) else x
    patches = F.unfold(padded, geometry.kernel, dilation=geometry.dilation, stride=geometry.stride)
    return patches.transpose(1, 2)


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """``H = (2/N)·Σ p·pᵀ`` of every layer's unfolded input, from one pass of ``batches`` through ``model``.

    Args:
        model: the dense model (run in eval mode, restored afterwards).
        layers: ``{name: Conv2d}`` (``compress.conv.layers.conv_candidates``).
        batches: model inputs, e.g. ``[B, C, H, W]`` float tensors.
        device: where the Hessians are accumulated.

    Returns:
        ``{name: H}``, each ``[in·kh·kw, in·kh·kw]`` fp32.

    Raises:
        ValueError: no batch reached a layer (e.g. an empty ``batches``).
    """
    geometries = {name: geometry_of(module, name) for name, module in layers.items()}
    accumulators = {name: HessianAccumulator(g.fan_in, device) for name, g in geometries.items()}
    handles = []
    for name, module in layers.items():
        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            accumulators[name].add_batch(unfold_input(args[0].float(), geometries[name]))
        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    empty = [name for name, acc in accumulators.items() if acc.nsamples == 0]
    if empty:
        raise ValueError(f"no calibration input reached layer(s) {empty}; pass at least one batch")
    logger.info("collected %d Hessians from %d images", len(accumulators), next(iter(accumulators.values())).nsamples)
    return {name: acc.hessian for name, acc in accumulators.items()}
