"""Which convolutions of a CNN get compressed.

By default every ``Conv2d`` that ``dsf_runtime.conv.unsupported_reason`` accepts and that has more than 3
input channels (the DSF CNN experiments keep the first, RGB/grayscale conv dense: ``docs/dsf-algorithm.md`` §1.6);
the others are skipped with a logged reason. Layers named explicitly must all be supported, or a ``ValueError``
names each offender and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from dsf_runtime.conv import unsupported_reason

__all__ = ["MIN_IN_CHANNELS", "conv_candidates"]

logger = logging.getLogger(__name__)

MIN_IN_CHANNELS = 4  # convs with fewer input channels (the stem) stay dense, as in the reference experiments


def conv_candidates(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Conv2d]:
    """The convolutions to compress, in module order.

    Args:
        model: any ``nn.Module``.
        layers: module names to compress; None = every supported ``Conv2d`` with ``in_channels >=
            MIN_IN_CHANNELS`` (unsupported ones, e.g. depthwise convs, are skipped and logged).

    Returns:
        ``{name: module}``.

    Raises:
        ValueError: an explicitly named layer does not exist or cannot be compressed (all offenders listed, each
            with the reason and the fix).
    """
    modules = dict(model.named_modules())
    if layers is None:
        chosen = {}
        for name, module in modules.items():
            if not isinstance(module, nn.Conv2d):
                continue
            reason = unsupported_reason(module)
            if reason is None and module.in_channels < MIN_IN_CHANNELS:
                reason = f"has {module.in_channels} input channel(s) (< {MIN_IN_CHANNELS}: the stem stays dense)"
            if reason:
                logger.info("skipping layer %r: it %s", name, reason)
            else:
                chosen[name] = module
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no convolution that can be compressed (see the log)")
        return chosen
    problems = []
    for name in layers:
        if name not in modules:
            problems.append(f"layer {name!r} does not exist in {type(model).__name__}; check the name")
            continue
        reason = unsupported_reason(modules[name])
        if reason:
            problems.append(f"layer {name!r} {reason}; leave it out of `layers` (it is skipped when no list is given)")
    if problems:
        raise ValueError("cannot compress the requested layers:\n  - " + "\n  - ".join(problems))
    order = {name: i for i, name in enumerate(modules)}
    return {name: modules[name] for name in sorted(dict.fromkeys(layers), key=order.__getitem__)}
