"""Compressed convolutions at run time: modules over packed buffers, and ``replace_conv`` to swap them into a model.

Runtime modules (buffers named like the directory's tensors, e.g. ``features.3.A.values``):

* ``FactorizedConv2d`` (kind ``dsf_conv``): ``kh×kw`` conv ``in → r`` with ``B``, then ``1×1`` conv ``r → out``
  with ``A`` and the bias;
* ``SparseConv2d`` (kind ``single_conv``): the conv with the packed ``W``;
* ``BasisConv2d`` (kind ``basis_conv``): ``kh×kw`` conv ``in → p`` with ``basis``, a ``1×1`` conv ``p → out − p``
  with ``coeff``, concatenation and a channel permutation.

Each forward unpacks its factors to dense conv weights (``to_dense``) and calls ``F.conv2d``; there is no sparse
convolution kernel. ``dsf_runtime.conv.standard`` turns them into plain ``nn.Conv2d`` modules.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime.conv.geometry import ConvGeometry, geometry_of
from dsf_runtime.conv.layer import CompressedConv
from dsf_runtime.formats import PackedMatrix
from dsf_runtime.modules import PackedFactor

__all__ = [
    "BasisConv2d",
    "FactorizedConv2d",
    "SparseConv2d",
    "conv2d",
    "conv_module_from_layer",
    "replace_conv",
]


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry) -> torch.Tensor:
    """``F.conv2d`` with the geometry's stride, dilation and (possibly asymmetric) zero padding.

    Args:
        x: ``[N, C, H, W]``; weight: ``[out, C, kh, kw]``; bias: ``[out]`` or None.
    """
    symmetric = geometry.symmetric_padding
    if symmetric is None:
        top, left, bottom, right = geometry.padding
        x, symmetric = F.pad(x, (left, right, top, bottom)), (0, 0)
    return F.conv2d(x, weight, bias, geometry.stride, symmetric, geometry.dilation)


class _PackedConv(nn.Module):
    """Shared parts: the geometry, the bias buffer and ``dense(name, dtype)`` -> the factor as a dense matrix."""

    def __init__(self, geometry: ConvGeometry, factors: Mapping[str, PackedMatrix], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.geometry = geometry
        self.in_channels, self.out_channels = geometry.in_channels, geometry.out_channels
        for name, packed in factors.items():
            self.add_module(name, PackedFactor(packed))
        self.register_buffer("bias", bias)

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Factor ``name`` unpacked to a dense ``[rows, cols]`` matrix of ``dtype``."""
        return self.get_submodule(name).packed().to_dense(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}")


class FactorizedConv2d(_PackedConv):
    """``y = conv1×1(conv_kh×kw(x, B), A) + b`` with packed ``A`` [out, r] and ``B`` [r, in·kh·kw].

    Shapes: ``x`` ``[N, in, H, W]`` -> ``[N, out, H', W']`` in ``x.dtype``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        inner = self.dense("B", x.dtype).view(-1, g.in_channels, *g.kernel)
        outer = self.dense("A", x.dtype)
        return F.conv2d(conv2d(x, inner, None, g), outer[:, :, None, None], self._bias(x.dtype))


class SparseConv2d(_PackedConv):
    """``y = conv(x, W) + b`` with one packed ``W`` [out, in·kh·kw]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return conv2d(x, self.dense("W", x.dtype).view(-1, g.in_channels, *g.kernel), self._bias(x.dtype), g)


class BasisConv2d(_PackedConv):
    """Basis convolution: ``Y_b = conv(x, basis)``, ``Y_r = coeff·Y_b`` (a 1×1 conv), output channels
    ``basis_channels`` take ``Y_b`` and the others (ascending) ``Y_r``; plus the bias.

    Buffers: ``basis.*`` [p, in·kh·kw], ``coeff.*`` [out − p, p], ``bias`` [out] or None, and the non-persistent
    ``order`` (int64 [out]): output channel ``o`` is channel ``order[o]`` of ``cat(Y_b, Y_r)``.
    """

    def __init__(self, geometry: ConvGeometry, factors: Mapping[str, PackedMatrix], bias: torch.Tensor | None,
                 basis_channels: tuple[int, ...]) -> None:
        super().__init__(geometry, factors, bias)
        self.basis_channels = tuple(basis_channels)
        self.register_buffer("order", _order(self.basis_channels, geometry.out_channels, bias), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        y = conv2d(x, self.dense("basis", x.dtype).view(-1, g.in_channels, *g.kernel), None, g)
        if len(self.basis_channels) < g.out_channels:  # else every filter is a basis filter
            y = torch.cat([y, F.conv2d(y, self.dense("coeff", x.dtype)[:, :, None, None])], dim=1)
        y = y.index_select(1, self.order)
        return y if self.bias is None else y + self.bias.to(x.dtype)[:, None, None]


def _order(basis_channels: tuple[int, ...], out_channels: int, like: torch.Tensor | None) -> torch.Tensor:
    """Inverse of the concatenation order ``basis_channels + rest``: int64 [out]."""
    basis = set(basis_channels)
    concat = list(basis_channels) + [c for c in range(out_channels) if c not in basis]
    order = torch.empty(out_channels, dtype=torch.int64)
    order[torch.tensor(concat, dtype=torch.int64)] = torch.arange(out_channels)
    return order if like is None else order.to(like.device)


def conv_module_from_layer(
    layer: CompressedConv, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> FactorizedConv2d | SparseConv2d | BasisConv2d:
    """The runtime module of a compressed convolution, tensors moved to ``device`` and cast to ``dtype``."""
    conv = layer.to(device, dtype)
    factors, bias = conv.layer.factors, conv.layer.bias
    if conv.layer.kind == "dsf_conv":
        return FactorizedConv2d(conv.geometry, factors, bias)
    if conv.layer.kind == "single_conv":
        return SparseConv2d(conv.geometry, factors, bias)
    return BasisConv2d(conv.geometry, factors, bias, conv.basis_channels or ())


def replace_conv(
    model: nn.Module,
    layers: Mapping[str, CompressedConv],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Swap each ``Conv2d`` named in ``layers`` for its runtime module; returns ``model``.

    Raises:
        ValueError: a name is not a module of the model, or the module's geometry differs from the layer's.
    """
    for fqn, layer in layers.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"the model has no module '{fqn}' to replace") from None
        geometry = geometry_of(old, fqn)
        if geometry != layer.geometry:
            raise ValueError(f"module '{fqn}' has geometry {geometry}, the compressed layer {layer.geometry}")
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, conv_module_from_layer(layer, device, dtype))
    return model
