"""ONNX export of a compressed CNN with standard operators only.

Every compressed module becomes its plain-PyTorch form before tracing (``dsf_runtime.conv.to_standard``), so the
graph holds ordinary nodes with dense initializers:

* ``dsf_conv``: ``Conv`` (``kh×kw``, ``in → r``, the layer's strides/pads/dilations) then ``Conv`` (``1×1``,
  ``r → out``, bias);
* ``single_conv``: one ``Conv``;
* ``basis_conv``: ``Conv`` (``in → p``) and ``Conv`` (``1×1``, ``p → out − p``), ``Concat`` on channels and
  ``Gather`` (axis 1) with the channel permutation;
* compressed linears (``FactorizedLinear``/``SparseLinear``): ``Gemm``/``MatMul`` nodes.

Asymmetric padding is a ``Pad`` node before the first ``Conv``. The batch dimension is dynamic. Sparse factors are
stored densely (zeros included): ONNX has no standard sparse convolution.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import onnx
import torch
from torch import nn

from dsf_runtime.conv import BasisConv2d, FactorizedConv2d, SparseConv2d, to_standard
from dsf_runtime.modules import FactorizedLinear, SparseLinear
from exporters._files import atomic_files

__all__ = ["MIN_CNN_OPSET", "export_cnn_onnx", "standard_model"]

logger = logging.getLogger(__name__)

MIN_CNN_OPSET = 18


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.to(weight.dtype))
    return layer


@torch.no_grad()
def standard_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every compressed module is replaced by plain ``nn.Conv2d``/``nn.Linear``
    modules computing the same thing (dense weights).

    Returns:
        The copy, in eval mode.
    """
    copied = copy.deepcopy(model).eval()
    replacements = {}
    for name, module in copied.named_modules():
        if isinstance(module, (FactorizedConv2d, SparseConv2d, BasisConv2d)):
            replacements[name] = to_standard(module)
        elif isinstance(module, FactorizedLinear):
            a, b = module.A.packed().to_dense(torch.float32), module.B.packed().to_dense(torch.float32)
            replacements[name] = nn.Sequential(_linear(b, None), _linear(a, module.bias))
        elif isinstance(module, SparseLinear):
            replacements[name] = _linear(module.W.packed().to_dense(torch.float32), module.bias)
    for name, replacement in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(copied.get_submodule(parent), child, replacement)
    logger.info("replaced %d compressed module(s) by standard ones", len(replacements))
    return copied.eval()


def _check_standard(model: onnx.ModelProto, path: Path) -> None:
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise RuntimeError(f"{path}: the exported graph has non-standard nodes {custom}; this is a bug")


def export_cnn_onnx(
    model: nn.Module,
    out: str | os.PathLike[str],
    example: torch.Tensor,
    *,
    opset: int = MIN_CNN_OPSET,
    overwrite: bool = False,
) -> Path:
    """Export a (compressed) CNN to one ``.onnx`` file with standard operators and a dynamic batch dimension.

    Args:
        model: e.g. ``load_compressed_into(FashionCNN(), dir)`` or ``compress_cnn(...).model`` (not modified).
        out: the ``.onnx`` path (written to a temporary name and moved into place).
        example: an input ``[N, C, H, W]`` (N >= 2: a batch of 1 would be specialized by the tracer).
        opset: default-domain opset, at least 18.
        overwrite: replace an existing ``out``.

    Returns:
        ``out`` as a Path. Input ``input`` ``[batch, C, H, W]``, output ``logits``.

    Raises:
        ValueError: ``opset`` below 18 or ``example`` with fewer than 2 images. FileExistsError: ``out`` exists
            and ``overwrite`` is False.
    """
    if opset < MIN_CNN_OPSET:
        raise ValueError(f"opset {opset} is too old; the CNN export needs opset >= {MIN_CNN_OPSET}")
    if example.dim() < 1 or example.shape[0] < 2:
        raise ValueError(f"example has shape {list(example.shape)}; pass a batch of at least 2 inputs")
    out = Path(out)
    standard = standard_model(model)
    with atomic_files(out, overwrite=overwrite) as staging:
        program = torch.onnx.export(
            standard, (example,), dynamo=True, opset_version=opset, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: "batch"},), external_data=False, verbose=False,
        )
        path = staging / out.name
        program.save(str(path))
        _check_standard(onnx.load(str(path)), out)
    logger.info("exported %s to %s (opset %d)", type(model).__name__, out, opset)
    return out
