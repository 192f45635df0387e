"""Sensitivity-based layer selection (Alekseev et al., arXiv 2408.06024, §3 of ``docs/dsf-algorithm.md``).

1. ``measure_sensitivity``: convert one layer at a time (every candidate form of it: several basis sizes or
   densities) and record the increase of a loss, e.g. the KL divergence to the dense model on calibration images.
2. ``select_under_budget``: pick, per layer, one form or "keep dense" so that the total cost (non-zero conv
   weights, or conv MACs) meets a budget with the least *predicted* loss, the sum of the single-layer
   increases: a multiple-choice knapsack, solved exactly by dynamic programming over costs discretized into
   ``resolution`` steps (costs rounded up, so the chosen set always meets the budget).

The single-layer measurement and the additive prediction are [inferred] (the paper's exact procedure was not
available): the abstract says the analysis selects "the subset of layers where the decomposition does not hurt".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from dsf_runtime.conv import CompressedConv, conv_module_from_layer

__all__ = ["Choice", "measure_sensitivity", "select_under_budget"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """One way to treat a layer.

    Attributes:
        label: e.g. ``"dense"`` or ``"basis 16/64"``.
        cost: its cost (non-zero weights or MACs).
        loss: predicted loss increase when only this layer is converted (0 for dense).
        layer: the compressed form, or None to keep the layer dense.
    """

    label: str
    cost: int
    loss: float
    layer: CompressedConv | None = None


def measure_sensitivity(
    model: nn.Module,
    options: Mapping[str, Sequence[CompressedConv]],
    score: Callable[[nn.Module], float],
) -> dict[str, list[float]]:
    """Loss increase of each option when it alone replaces its layer.

    Args:
        model: the dense model; modules are swapped and restored in place.
        options: ``{layer name: [compressed forms]}``.
        score: the loss of a model (lower is better), e.g. KL divergence to the dense logits.

    Returns:
        ``{layer name: [score(model with that form) − score(dense model)]}``, in ``options`` order.
    """
    baseline = score(model)
    increases: dict[str, list[float]] = {}
    for name, forms in options.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
        increases[name] = []
        try:
            for form in forms:
                setattr(parent, child, conv_module_from_layer(form))
                increases[name].append(score(model) - baseline)
        finally:
            setattr(parent, child, original)
        logger.info("sensitivity of %r: %s", name, ", ".join(f"{d:.4g}" for d in increases[name]))
    return increases


def select_under_budget(
    choices: Mapping[str, Sequence[Choice]],
    budget: int,
    *,
    fixed_cost: int = 0,
    resolution: int = 4000,
) -> dict[str, Choice]:
    """Per layer one choice, total cost ``fixed_cost + Σ cost <= budget``, least total predicted loss.

    Args:
        choices: ``{layer name: [Choice]}``; include a ``"dense"`` choice to allow keeping a layer.
        budget: the total cost allowed.
        fixed_cost: cost of what is not a candidate (e.g. the stem and depthwise convs).
        resolution: number of cost steps of the dynamic program.

    Returns:
        ``{layer name: chosen Choice}``.

    Raises:
        ValueError: the budget cannot be met even with the cheapest choice of every layer (naming the layer whose
            cheapest choice costs most) or a layer has no choice.
    """
    empty = [name for name, options in choices.items() if not options]
    if empty:
        raise ValueError(f"layer(s) {empty} have no choice; give each layer at least one option")
    capacity = budget - fixed_cost
    cheapest = {name: min(options, key=lambda c: c.cost) for name, options in choices.items()}
    least = sum(c.cost for c in cheapest.values())
    if capacity < least:
        worst = max(cheapest, key=lambda name: cheapest[name].cost)
        raise ValueError(
            f"a budget of {budget:,} cannot be met: the layers that are not candidates take {fixed_cost:,} and the "
            f"cheapest option of every candidate {least:,} more (largest: layer {worst!r} needs "
            f"{cheapest[worst].cost:,} as {cheapest[worst].label!r}); raise the budget or offer smaller options"
        )
    unit = max(1, math.ceil(capacity / resolution))
    steps = capacity // unit
    best = [0.0] * (steps + 1)  # best[c]: least loss of the layers so far with total cost units <= c
    picks: list[list[int]] = []
    for options in choices.values():
        units = [math.ceil(c.cost / unit) for c in options]
        new = [math.inf] * (steps + 1)
        pick = [-1] * (steps + 1)
        for c in range(steps + 1):
            for i, (u, option) in enumerate(zip(units, options, strict=True)):
                if u <= c and best[c - u] + option.loss < new[c]:
                    new[c], pick[c] = best[c - u] + option.loss, i
        best = new
        picks.append(pick)
    if math.isinf(best[steps]):
        raise ValueError(
            f"a budget of {budget:,} is too tight to meet after rounding costs to steps of {unit:,}; raise the "
            "budget slightly or the resolution"
        )
    chosen: dict[str, Choice] = {}
    c = steps
    for (name, options), pick in zip(reversed(list(choices.items())), reversed(picks), strict=True):
        option = options[pick[c]]
        chosen[name] = option
        c -= math.ceil(option.cost / unit)
    return {name: chosen[name] for name in choices}
