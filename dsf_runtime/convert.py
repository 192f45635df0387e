"""Conversion of compressed layers to the GPU kernels' layouts, in one place for both loaders
(``dsf_runtime.loader.from_pretrained`` and transformers' through ``dsf_runtime.hf``) and for a model loaded
elsewhere (``use_kernels``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dsf_runtime.formats import kernel_layout
from dsf_runtime.kernels import unavailable_reason
from dsf_runtime.layer import CompressedLayer
from dsf_runtime.modules import FactorizedLinear, SparseLinear

__all__ = ["compressed_modules", "kernel_layer", "use_kernels"]


def kernel_layer(layer: CompressedLayer) -> CompressedLayer:
    """``layer`` with every factor in the GPU kernels' layout with the fewest bytes (stored kernel layouts kept)."""
    return dataclasses.replace(layer, factors={k: kernel_layout(f) for k, f in layer.factors.items()})


def compressed_modules(model: nn.Module) -> list[tuple[str, FactorizedLinear | SparseLinear]]:
    """``(name, module)`` of every compressed linear of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, SparseLinear))]


def use_kernels(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Convert, in place, every compressed module of ``model`` whose factors are not all in a kernel layout
    (values cast to ``dtype``, default their own). Each module then holds only the kernel layouts. Returns the number
    of modules converted.

    Raises:
        RuntimeError: the kernels cannot run where the model's weights are (``unavailable_reason``).
    """
    converted = 0
    for name, module in compressed_modules(model):
        factors = module.factors()
        reason = unavailable_reason(factors[0].device)
        if reason:
            raise RuntimeError(f"cannot convert '{name}' for the kernels: {reason}; keep the stored layouts "
                               "(pure-torch path) or move the model to a CUDA device first")
        new = [kernel_layout(f, dtype) for f in factors]
        if any(n is not f for n, f in zip(new, factors)):
            module.set_factors(new)
            converted += 1
    return converted
