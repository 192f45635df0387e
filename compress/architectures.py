"""Per-architecture data: where the decoder blocks are and which linear layers share an input.

Linears of one *group* read the same input inside a block (e.g. q/k/v all read the normed hidden states), so
they share one Hessian ``H = (2/N)·Σ xxᵀ``. Groups are listed in the order the block computes them, which is
the order ``true_sequential`` compresses them in. Nothing here runs a model; ``compress/calibration.py`` reads
this data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ArchitectureSpec", "ARCHITECTURES", "architecture_for", "decoder_blocks", "block_groups", "truncate_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a decoder's blocks live and how their linears are grouped.

    Attributes:
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks, from the ``*ForCausalLM`` model.
        groups: per block, the linears (paths relative to the block) grouped by shared input, in compute order.
    """

    blocks: str
    groups: tuple[tuple[str, ...], ...]


_LLAMA_LIKE = ArchitectureSpec(
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

# Keyed by ``config.model_type``.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": ArchitectureSpec(
        blocks="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
}


def architecture_for(config: Any) -> ArchitectureSpec:
    """The spec of a model from its Hugging Face config (``config.model_type``).

    Raises:
        ValueError: the model type is not in ``ARCHITECTURES``, or its blocks are not all of one attention
            type (the driver replays the first block's mask and position inputs for every block).
    """
    model_type = getattr(config, "model_type", None)
    classes = ", ".join(getattr(config, "architectures", None) or [])
    name = f"model_type {model_type!r}" + (f" ({classes})" if classes else "")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture: {name}; supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ValueError(
            f"unsupported architecture: {name} mixes attention layer types {sorted(set(layer_types))}; only "
            "models whose blocks all use one attention type are supported (e.g. disable sliding windows)"
        )
    return ARCHITECTURES[model_type]


def decoder_blocks(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks at ``spec.blocks``."""
    blocks = model.get_submodule(spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{spec.blocks} is {type(blocks).__name__}, expected torch.nn.ModuleList of decoder blocks")
    return blocks


def block_groups(block: nn.Module, spec: ArchitectureSpec, prefix: str) -> list[list[tuple[str, nn.Linear]]]:
    """The block's linears as ``[[(fully-qualified name, module), ...] per group]``.

    Args:
        block: one decoder block.
        spec: its architecture spec.
        prefix: the block's fully-qualified name, e.g. ``"model.layers.3"``.

    Raises:
        ValueError: a listed module is missing or is not exactly ``torch.nn.Linear`` (e.g. GPT-2's ``Conv1D``
            or an already quantized layer), naming every such module.
    """
    groups, problems = [], []
    for names in spec.groups:
        group = []
        for name in names:
            fqn = f"{prefix}.{name}"
            try:
                module = block.get_submodule(name)
            except AttributeError:
                problems.append(f"{fqn} is missing")
                continue
            if type(module) is not nn.Linear:
                problems.append(f"{fqn} is {type(module).__name__}, expected torch.nn.Linear")
                continue
            group.append((fqn, module))
        groups.append(group)
    if problems:
        raise ValueError("unsupported layer type: " + "; ".join(problems))
    listed = {name for names in spec.groups for name in names}
    skipped = [f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in listed]
    if skipped:
        logger.warning("linear layers not in any group stay dense: %s", ", ".join(skipped))
    return groups


def truncate_blocks(model: nn.Module, num_blocks: int) -> nn.Module:
    """Keep only the first ``num_blocks`` decoder blocks (in place; for smoke tests and quick runs).

    Updates ``config.num_hidden_layers`` (and ``config.layer_types`` when present) so the model saves and
    reloads with that many blocks. Returns ``model``.
    """
    spec = architecture_for(model.config)
    blocks = decoder_blocks(model, spec)
    if not 1 <= num_blocks <= len(blocks):
        raise ValueError(f"num_blocks must be in [1, {len(blocks)}], got {num_blocks}")
    parent_path, _, attr = spec.blocks.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, nn.ModuleList(list(blocks)[:num_blocks]))
    model.config.num_hidden_layers = num_blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:num_blocks]
    return model
