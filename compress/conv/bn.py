"""Batch-norm re-estimation after compression (``docs/dsf-algorithm.md`` §1.6: the DSF CNN experiments reset the
BN statistics and re-estimate them on training batches; "DSF + BN tuning").

The reference runs 100 train-mode batches of 128 with momentum 0.1 after resetting the statistics. With
``momentum=None`` (the default here) PyTorch keeps the exact cumulative average over the given batches instead,
which is what the exponential average approaches with many batches and is right for few batches too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["reestimate_bn"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor], momentum: float | None = None) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them on ``batches``.

    Only the batch-norm layers run in train mode (dropout and the rest stay in eval mode); the model's mode and
    each layer's momentum are restored afterwards. Weights are not changed.

    Args:
        model: any ``nn.Module``.
        batches: model inputs (e.g. ``[B, C, H, W]``); every batch needs more than one value per channel.
        momentum: None = cumulative average (default); a float = exponential average as in the reference (0.1).

    Returns:
        The number of batch-norm layers re-estimated (0 when the model has none).

    Raises:
        ValueError: the model has batch-norm layers but no batch was given.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = momentum
        m.train()
    count = 0
    try:
        for batch in batches:
            model(batch)
            count += 1
    finally:
        for m, old_momentum, _ in saved:
            m.momentum = old_momentum
        model.train(was_training)
    if count == 0:
        raise ValueError(
            f"no batch given to re-estimate the {len(norms)} batch-norm layer(s) of {type(model).__name__}"
        )
    logger.info("re-estimated %d batch-norm layer(s) on %d batch(es)", len(norms), count)
    return len(norms)
