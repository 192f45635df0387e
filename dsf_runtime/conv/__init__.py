"""Compressed convolutions (docs/format.md, "Convolution layers"), kept apart from the generic checkpoint:

* ``geometry``: ``ConvGeometry``, ``geometry_of``, ``unsupported_reason``;
* ``layer``: ``CompressedConv`` (a generic ``CompressedLayer`` plus the geometry), ``CONV_FACTORS``;
* ``modules``: the runtime modules ``FactorizedConv2d``/``SparseConv2d``/``BasisConv2d`` and ``replace_conv``;
* ``standard``: their ``nn.Conv2d`` forms (``to_standard``, ``from_standard``);
* ``loading``: the conv reader over ``dsf_runtime.checkpoint`` (``open_conv_checkpoint``, ``load_conv_layer``) and
  ``load_compressed_into``.
"""

from dsf_runtime.conv.geometry import ConvGeometry, geometry_of, unsupported_reason
from dsf_runtime.conv.layer import CONV_FACTORS, CompressedConv, conv_entry_problem
from dsf_runtime.conv.loading import load_compressed_into, load_conv_layer, open_conv_checkpoint
from dsf_runtime.conv.modules import (
    BasisConv2d,
    FactorizedConv2d,
    SparseConv2d,
    conv2d,
    conv_module_from_layer,
    replace_conv,
)
from dsf_runtime.conv.standard import StandardBasisConv, from_standard, to_standard

__all__ = [
    "CONV_FACTORS",
    "BasisConv2d",
    "CompressedConv",
    "ConvGeometry",
    "FactorizedConv2d",
    "SparseConv2d",
    "StandardBasisConv",
    "conv2d",
    "conv_entry_problem",
    "conv_module_from_layer",
    "from_standard",
    "geometry_of",
    "load_compressed_into",
    "load_conv_layer",
    "open_conv_checkpoint",
    "replace_conv",
    "to_standard",
    "unsupported_reason",
]
