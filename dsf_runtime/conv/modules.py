"""Compressed convolutions at run time: modules over packed buffers, their plain-``nn.Conv2d`` equivalents, and
``load_compressed_into`` for models that are not Hugging Face models (the CNNs of ``compress.conv``).

Runtime modules (buffers named like the directory's tensors, e.g. ``features.3.A.values``):

* ``FactorizedConv2d`` (kind ``dsf_conv``): ``kh×kw`` conv ``in → r`` with ``B``, then ``1×1`` conv ``r → out``
  with ``A`` and the bias;
* ``SparseConv2d`` (kind ``single_conv``): the conv with the packed ``W``;
* ``BasisConv2d`` (kind ``basis_conv``): ``kh×kw`` conv ``in → p`` with ``basis``, a ``1×1`` conv ``p → out − p``
  with ``coeff``, concatenation and a channel permutation.

Each forward unpacks its factors to dense conv weights (``to_dense``) and calls ``F.conv2d``; there is no sparse
convolution kernel. ``to_standard`` turns a runtime module into the same computation built from ``nn.Conv2d``
(and ``ZeroPad2d`` for asymmetric padding), which trains (``compress.conv`` fine-tuning) and exports to ONNX as
ordinary ``Conv`` nodes (``exporters.onnx_cnn``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime.checkpoint import CheckpointError, open_compressed
from dsf_runtime.conv_layer import CompressedConv, ConvGeometry, geometry_of
from dsf_runtime.formats import PackedMatrix
from dsf_runtime.modules import PackedFactor, replace_linear

__all__ = [
    "BasisConv2d",
    "FactorizedConv2d",
    "SparseConv2d",
    "StandardBasisConv",
    "conv2d",
    "conv_module_from_layer",
    "from_standard",
    "load_compressed_into",
    "replace_conv",
    "to_standard",
]

logger = logging.getLogger(__name__)

_FIX = "the checkpoint does not fit this model; build the model it was compressed from"


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
    layer = layer.to(device, dtype)
    assert layer.geometry is not None
    if layer.kind == "dsf_conv":
        return FactorizedConv2d(layer.geometry, layer.factors, layer.bias)
    if layer.kind == "single_conv":
        return SparseConv2d(layer.geometry, layer.factors, layer.bias)
    return BasisConv2d(layer.geometry, layer.factors, layer.bias, layer.basis_channels or ())


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


class StandardBasisConv(nn.Module):
    """``BasisConv2d`` from plain modules: ``pad`` (ZeroPad2d or Identity), ``basis`` (Conv2d in → p, bias
    ``b_basis``), ``coeff`` (1×1 Conv2d p → out − p, bias ``b_rest − coeff·b_basis``), then concatenation and the
    ``order`` permutation (ONNX: ``Conv``, ``Conv``, ``Concat``, ``Gather``). ``coeff`` is None when every filter is
    a basis filter."""

    def __init__(self, pad: nn.Module, basis: nn.Conv2d, coeff: nn.Conv2d | None, order: torch.Tensor) -> None:
        super().__init__()
        self.pad, self.basis, self.coeff = pad, basis, coeff
        self.register_buffer("order", order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.basis(self.pad(x))
        if self.coeff is not None:
            y = torch.cat([y, self.coeff(y)], dim=1)
        return y.index_select(1, self.order)


def _plain_conv(weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry | None) -> nn.Conv2d:
    """An ``nn.Conv2d`` holding ``weight`` [out, in, kh, kw] (1×1 when ``geometry`` is None)."""
    out, inp, kh, kw = weight.shape
    g = geometry
    conv = nn.Conv2d(inp, out, (kh, kw), stride=g.stride if g else 1, padding=(g.symmetric_padding or 0) if g else 0,
                     dilation=g.dilation if g else 1, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _padding_module(geometry: ConvGeometry) -> nn.Module:
    if geometry.symmetric_padding is not None:
        return nn.Identity()
    top, left, bottom, right = geometry.padding
    return nn.ZeroPad2d((left, right, top, bottom))


@torch.no_grad()
def to_standard(module: FactorizedConv2d | SparseConv2d | BasisConv2d) -> nn.Module:
    """The same computation from ``nn.Conv2d`` modules with dense fp32 (or the values') weights.

    ``dsf_conv`` -> ``Sequential(pad, Conv2d(in → r, kh×kw), Conv2d(r → out, 1×1))``; ``single_conv`` ->
    ``Sequential(pad, Conv2d)``; ``basis_conv`` -> ``StandardBasisConv``. ``pad`` is ``Identity`` unless the padding
    is asymmetric.
    """
    g = module.geometry
    dtype = next(b for b in module.buffers() if b.is_floating_point()).dtype
    kernel = (g.in_channels, *g.kernel)
    if isinstance(module, FactorizedConv2d):
        inner = module.dense("B", dtype)
        outer = module.dense("A", dtype)
        return nn.Sequential(_padding_module(g), _plain_conv(inner.view(-1, *kernel), None, g),
                             _plain_conv(outer[:, :, None, None], module.bias, None))
    if isinstance(module, SparseConv2d):
        weight = module.dense("W", dtype).view(-1, *kernel)
        return nn.Sequential(_padding_module(g), _plain_conv(weight, module.bias, g))
    basis, coeff = module.dense("basis", dtype), module.dense("coeff", dtype)
    bias_basis = bias_rest = None
    if module.bias is not None:
        bias = module.bias.to(dtype)
        bias_basis = bias[list(module.basis_channels)]
        rest = [c for c in range(g.out_channels) if c not in set(module.basis_channels)]
        bias_rest = bias[rest] - coeff @ bias_basis
    coeff_conv = _plain_conv(coeff[:, :, None, None], bias_rest, None) if len(coeff) else None
    return StandardBasisConv(_padding_module(g), _plain_conv(basis.view(-1, *kernel), bias_basis, g), coeff_conv,
                             module.order.clone())


@torch.no_grad()
def from_standard(module: nn.Module, template: CompressedConv) -> CompressedConv:
    """Inverse of ``to_standard`` (after e.g. fine-tuning): the layer with ``template``'s kind, geometry, method,
    basis channels and factor layout, weights taken from ``module``; ``error`` is cleared (it is stale).

    Raises:
        TypeError: ``module`` is not what ``to_standard`` builds for ``template.kind``.
    """
    layout = next(iter(template.factors.values())).layout
    kind = template.kind
    if kind == "basis_conv" and isinstance(module, StandardBasisConv):
        basis = module.basis.weight.flatten(1).float()
        coeff = basis.new_zeros(0, len(basis)) if module.coeff is None else module.coeff.weight.flatten(1).float()
        bias = None
        if module.basis.bias is not None:
            bias = module.basis.bias.new_zeros(template.shape[0]).float()
            bias[list(template.basis_channels or ())] = module.basis.bias.float()
            if module.coeff is not None:
                bias[template.rest_channels()] = module.coeff.bias.float() + coeff @ module.basis.bias.float()
        factors = {"basis": basis, "coeff": coeff}
    elif kind == "dsf_conv" and isinstance(module, nn.Sequential) and len(module) == 3:
        factors = {"A": module[2].weight.flatten(1).float(), "B": module[1].weight.flatten(1).float()}
        bias = None if module[2].bias is None else module[2].bias.float()
    elif kind == "single_conv" and isinstance(module, nn.Sequential) and len(module) == 2:
        factors = {"W": module[1].weight.flatten(1).float()}
        bias = None if module[1].bias is None else module[1].bias.float()
    else:
        raise TypeError(f"a {type(module).__name__} is not the standard form of a {kind} layer; use to_standard")
    assert template.geometry is not None
    return CompressedConv.from_dense(kind, factors, geometry=template.geometry, method=template.method, bias=bias,
                                     basis_channels=template.basis_channels, layout=layout)


def _owner(name: str, compressed: set[str]) -> str | None:
    """The compressed layer that owns state-dict entry ``name``, or None."""
    prefix = name
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in compressed:
            return prefix
    return None


def load_compressed_into(
    model: nn.Module,
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a compressed directory into a freshly built model of the same architecture (any ``nn.Module``).

    Compressed convolutions become ``FactorizedConv2d``/``SparseConv2d``/``BasisConv2d``, compressed linears
    ``FactorizedLinear``/``SparseLinear``; every other parameter and buffer is read from the directory and checked
    against the model (missing, unexpected, shape).

    Args:
        model: e.g. ``MNISTNet(28)``; its weights are overwritten.
        directory: written by ``save_compressed`` (``compress.conv.save_cnn``).
        device: where everything is loaded. dtype: cast floating tensors and factor values (None keeps them).

    Returns:
        ``model`` in eval mode.

    Raises:
        CheckpointError: naming the file and tensor that is missing, unexpected or of the wrong shape.
        ValueError: a compressed layer's module is missing from the model or has another geometry.
    """
    ckpt = open_compressed(directory)
    for fqn in ckpt.layers:
        layer = ckpt.load_layer(fqn, device)
        if isinstance(layer, CompressedConv):
            replace_conv(model, {fqn: layer}, dtype=dtype)
        else:
            replace_linear(model, {fqn: layer}, dtype=dtype)
    compressed = set(ckpt.layers)
    expected = {k: v for k, v in model.state_dict().items() if _owner(k, compressed) is None}
    tensors = ckpt.load_tensors(device, dtype)
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: unexpected tensor '{name}' ({type(model).__name__} has no such uncompressed "
                f"parameter or buffer); {_FIX}"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{ckpt.file_of(name)}: '{name}' has shape {list(tensor.shape)}, {type(model).__name__} expects "
                f"{list(expected[name].shape)}; {_FIX}"
            )
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{ckpt.file_of(missing[0])}: tensor '{missing[0]}' is missing; {_FIX}")
    model.load_state_dict(tensors, strict=False)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    logger.info("loaded %s into %s (%d compressed layers)", Path(directory), type(model).__name__, len(compressed))
    return model.eval()
