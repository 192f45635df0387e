"""Modules that hold packed weights: ``FactorizedLinear`` (``W ≈ A·B``) and ``SparseLinear`` (one packed ``W``).

Buffers have fixed names equal to the directory format's tensor names: a ``FactorizedLinear`` at module path ``P``
has ``P.A.values``, ``P.A.col_idx``, ``P.A.row_ptr``, ... (child modules ``A`` and ``B`` of type ``PackedFactor``)
and ``P.bias``, so ``model.state_dict()`` matches the file. Forward calls ``dsf_runtime.ops``, where GPU kernels
plug in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dsf_runtime import ops
from dsf_runtime.formats import LAYOUTS, PackedMatrix
from dsf_runtime.layer import CompressedLayer

__all__ = ["FactorizedLinear", "PackedFactor", "SparseLinear", "module_from_layer", "replace_linear"]


class PackedFactor(nn.Module):
    """One packed matrix as buffers named after its parts (``values``, ``col_idx``, ``row_ptr``, ``bitmask``)."""

    def __init__(self, packed: PackedMatrix) -> None:
        super().__init__()
        self.layout = packed.layout
        self.shape = tuple(packed.shape)
        for name, tensor in packed.to_tensors().items():
            self.register_buffer(name, tensor)
        self._packed: PackedMatrix | None = None

    def packed(self) -> PackedMatrix:
        """The packed matrix over the current buffers (no copy). The same object is returned until a buffer is
        replaced (``.to()``, ``load_state_dict(assign=True)``), so kernels may cache per-object conversions."""
        cls = LAYOUTS[self.layout]
        cached = self._packed
        if cached is None or any(getattr(cached, p) is not getattr(self, p) for p in cls.parts):
            cached = self._packed = cls(**{p: getattr(self, p) for p in cls.parts}, shape=self.shape)
        return cached

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={list(self.shape)}, dtype={self.values.dtype}"


class FactorizedLinear(nn.Module):
    """``y = A·(B·x) + b`` with packed ``A`` [out, r] and ``B`` [r, in]; the intermediate ``B·x`` is fp32.

    Args:
        A, B: packed factors. bias: ``[out]`` or None.
    Shapes: ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``.
    """

    def __init__(self, A: PackedMatrix, B: PackedMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"factors do not chain: A is {list(A.shape)}, B is {list(B.shape)}")
        self.in_features, self.out_features, self.inner_dim = B.shape[1], A.shape[0], A.shape[1]
        self.A, self.B = PackedFactor(A), PackedFactor(B)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dsf_linear(x, self.A.packed(), self.B.packed(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, inner_dim={self.inner_dim}"


class SparseLinear(nn.Module):
    """``y = x·Wᵀ + b`` with one packed ``W`` [out, in]; ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``."""

    def __init__(self, W: PackedMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = W.shape
        self.W = PackedFactor(W)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse_linear(x, self.W.packed(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def module_from_layer(
    layer: CompressedLayer, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> FactorizedLinear | SparseLinear:
    """The module for a compressed layer, its tensors moved to ``device`` and values/bias cast to ``dtype``."""
    layer = layer.to(device, dtype)
    if layer.kind == "dsf":
        return FactorizedLinear(layer.factors["A"], layer.factors["B"], layer.bias)
    return SparseLinear(layer.factors["W"], layer.bias)


def replace_linear(
    model: nn.Module,
    layers: Mapping[str, CompressedLayer],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Swap each module named in ``layers`` (an ``nn.Linear`` of the layer's shape, possibly on ``meta``) for a
    ``FactorizedLinear``/``SparseLinear`` on ``device`` with values in ``dtype``; returns ``model``.

    Raises:
        ValueError: a name is not a Linear of the model or its shape differs from the layer's.
    """
    for fqn, layer in layers.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"the model has no module '{fqn}' to replace") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != tuple(layer.shape):
            found = f"{type(old).__name__} {[getattr(old, 'out_features', '?'), getattr(old, 'in_features', '?')]}"
            raise ValueError(f"module '{fqn}' is {found}, expected a Linear of shape {list(layer.shape)}")
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module_from_layer(layer, device, dtype))
    return model
