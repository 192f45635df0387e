"""The plain-PyTorch form of the runtime convolutions and back: ``to_standard`` builds the same computation from
``nn.Conv2d`` (and ``ZeroPad2d`` for asymmetric padding), which trains (``compress.conv`` fine-tuning) and exports to
ONNX as ordinary ``Conv`` nodes (``exporters.onnx_cnn``); ``from_standard`` packs the trained weights again.
"""

from __future__ import annotations

import torch
from torch import nn

from dsf_runtime.conv.geometry import ConvGeometry
from dsf_runtime.conv.layer import CompressedConv
from dsf_runtime.conv.modules import BasisConv2d, FactorizedConv2d, SparseConv2d

__all__ = ["StandardBasisConv", "from_standard", "to_standard"]


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
    """``Identity`` for symmetric padding (the conv pads), else the ``ZeroPad2d`` of the asymmetric padding."""
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
    dtype = next(t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()).dtype
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
    layout = next(iter(template.layer.factors.values())).layout
    kind, shape = template.layer.kind, template.layer.shape
    if kind == "basis_conv" and isinstance(module, StandardBasisConv):
        basis = module.basis.weight.flatten(1).float()
        coeff = basis.new_zeros(0, len(basis)) if module.coeff is None else module.coeff.weight.flatten(1).float()
        bias = None
        if module.basis.bias is not None:
            bias = module.basis.bias.new_zeros(shape[0]).float()
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
    return CompressedConv.from_dense(kind, factors, geometry=template.geometry, method=template.layer.method, bias=bias,
                                     basis_channels=template.basis_channels, layout=layout)
