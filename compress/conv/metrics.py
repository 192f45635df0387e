"""Size, cost and quality of a (compressed) CNN: non-zero parameters, multiply-accumulates, accuracy, agreement.

Counting rules (theoretical, zero-skipping): a weight counts when it is non-zero; a convolution costs
``(non-zero weights)·H_out·W_out`` multiply-accumulates per image (``FactorizedConv2d``: ``nnz(A) + nnz(B)``;
``BasisConv2d``: ``p·in·kh·kw + (out − p)·p``, its coefficient conv running at the output resolution), a linear
layer its non-zero weights. Biases and batch-norm affine parameters count as parameters, not as MACs (BN folds
into the preceding convolution). ``flops = 2·macs``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime.conv import BasisConv2d, FactorizedConv2d, SparseConv2d
from dsf_runtime.modules import FactorizedLinear, SparseLinear

__all__ = ["ModelCost", "evaluate", "kl_divergence", "logits", "model_cost", "output_positions"]

_CONVS = (nn.Conv2d, FactorizedConv2d, SparseConv2d, BasisConv2d)
_PACKED = (FactorizedConv2d, SparseConv2d, BasisConv2d, FactorizedLinear, SparseLinear)


@dataclass(frozen=True)
class ModelCost:
    """Per-image cost of a model.

    Attributes:
        params: non-zero parameters (weights, factors, biases, BN affine).
        conv_params: non-zero convolution weights (factors included, biases excluded).
        macs: multiply-accumulates of the convolutions and linear layers per image.
        conv_macs: those of the convolutions.
    """

    params: int
    conv_params: int
    macs: int
    conv_macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "flops": self.flops}


def _weights(module: nn.Module) -> int:
    """Non-zero weights of a leaf layer (biases excluded)."""
    if isinstance(module, _PACKED):
        return sum(child.packed().nnz for name, child in module.named_children())
    weight = getattr(module, "weight", None)
    return int(torch.count_nonzero(weight)) if isinstance(weight, torch.Tensor) else 0


def _extra_params(module: nn.Module) -> int:
    """Non-zero parameters that are not weights (biases, BN affine)."""
    if isinstance(module, _PACKED):
        return 0 if module.bias is None else int(torch.count_nonzero(module.bias))
    own = [p for name, p in module.named_parameters(recurse=False) if name != "weight" or not _is_layer(module)]
    return sum(int(torch.count_nonzero(p)) for p in own)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (*_CONVS, nn.Linear, FactorizedLinear, SparseLinear))


@torch.no_grad()
def model_cost(model: nn.Module, example: torch.Tensor) -> ModelCost:
    """Count ``model``'s non-zero parameters and per-image MACs (module docstring) with one forward of ``example``
    (``[1, C, H, W]``; only its shape matters)."""
    positions = output_positions(model, example)
    params = conv_params = macs = conv_macs = 0
    for name, module in model.named_modules():  # PackedFactor children hold buffers only and count nothing
        weights = _weights(module) if _is_layer(module) else 0
        params += weights + _extra_params(module)
        if isinstance(module, _CONVS):
            conv_params += weights
            conv_macs += weights * positions.get(name, 0)
        elif _is_layer(module):
            macs += weights
    return ModelCost(params, conv_params, macs + conv_macs, conv_macs)


@torch.no_grad()
def output_positions(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``H_out·W_out`` of every convolution (``nn.Conv2d`` or compressed), by module name, from one forward of
    ``example`` (``[1, C, H, W]``)."""
    names = {m: name for name, m in model.named_modules() if isinstance(m, _CONVS)}
    positions: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda m, i, o: positions.__setitem__(names[m], o.shape[-2] * o.shape[-1]))
               for m in names]
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return positions


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model(images)`` in eval mode, batch by batch: ``[N, classes]`` fp32."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(batch).float() for batch in images.split(batch_size)])
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Quality of ``model`` on ``images``.

    Args:
        labels: ``[N]`` int64 -> ``accuracy``.
        reference: logits ``[N, classes]`` of the dense model -> ``agreement`` (top-1 equal) and ``kl`` (mean
            ``KL(dense ‖ model)`` of the softmax outputs, nats).

    Returns:
        ``{"accuracy": ..., "agreement": ..., "kl": ...}`` with the keys the arguments allow.
    """
    out = logits(model, images, batch_size)
    result = {}
    if labels is not None:
        result["accuracy"] = float((out.argmax(1) == labels).float().mean())
    if reference is not None:
        result["agreement"] = float((out.argmax(1) == reference.argmax(1)).float().mean())
        result["kl"] = kl_divergence(reference, out)
    return result


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean ``KL(softmax(reference) ‖ softmax(other))`` over the rows, in nats."""
    return float(F.kl_div(F.log_softmax(other, 1), F.log_softmax(reference, 1), log_target=True,
                          reduction="batchmean"))
