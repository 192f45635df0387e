"""Short fine-tuning of compressed convolutions by distillation from the dense model.

Each compressed convolution is swapped for its ``nn.Conv2d`` form (``dsf_runtime.conv.to_standard``); only those
weights train (basis filters and coefficients for ``basis_conv``; both factors of ``dsf_conv``; ``W`` of
``single_conv``), with Adam on the KL divergence between the dense model's and the compressed model's softmax
outputs, so no labels are needed. Sparse kinds keep their support: pruned entries are zeroed again after every
step. Batch-norm layers stay in eval mode (re-estimate them afterwards, ``compress.conv.bn``). The basis-conv
fine-tuning is [inferred] (``docs/dsf-algorithm.md`` §3.2: the paper trains basis and coefficients; its schedule
is unknown).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime.conv import CompressedConv, conv_module_from_layer, from_standard, to_standard

__all__ = ["finetune"]

logger = logging.getLogger(__name__)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    layers: Mapping[str, CompressedConv],
    batches: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
) -> dict[str, CompressedConv]:
    """Fine-tune the compressed convolutions ``layers`` of ``model`` (runtime modules in place) toward ``teacher``.

    Args:
        model: the compressed model; its compressed convolutions are replaced by fine-tuned runtime modules.
        teacher: the dense model (eval mode, not modified).
        layers: the compressed convolutions in ``model``, by module name.
        batches: training inputs, cycled through ``steps`` times.
        steps: optimizer steps (>= 1).
        lr: Adam learning rate.

    Returns:
        The fine-tuned layers (same kinds, supports and layouts; ``error`` cleared).

    Raises:
        ValueError: ``steps < 1`` or no batch.
    """
    if steps < 1 or not batches:
        raise ValueError(f"fine-tuning needs steps >= 1 and at least one batch, got steps={steps}, "
                         f"{len(batches)} batch(es)")
    standard = {}
    for name in layers:
        standard[name] = to_standard(model.get_submodule(name))
        _swap(model, name, standard[name])
    trained = {id(p) for module in standard.values() for p in module.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
    masks = [(conv.weight, conv.weight != 0) for name, module in standard.items() if layers[name].layer.kind != "basis_conv"
             for conv in module.modules() if isinstance(conv, nn.Conv2d)]
    optimizer = torch.optim.Adam([p for module in standard.values() for p in module.parameters()], lr=lr)
    was_training = model.training
    model.eval()
    teacher.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(steps):
                x = batches[step % len(batches)]
                with torch.no_grad():
                    target = F.log_softmax(teacher(x).float(), 1)
                loss = F.kl_div(F.log_softmax(model(x).float(), 1), target, log_target=True, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for weight, mask in masks:
                        weight.mul_(mask)
                if (step + 1) % 50 == 0 or step == 0:
                    logger.info("fine-tune step %d/%d: KL %.5f", step + 1, steps, loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    tuned = {name: from_standard(standard[name], layer) for name, layer in layers.items()}
    for name, layer in tuned.items():
        _swap(model, name, conv_module_from_layer(layer))
    return tuned
