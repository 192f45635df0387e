"""Reading compressed convolutions from a directory: the conv-specific checks on top of the generic
``dsf_runtime.checkpoint`` reader, and ``load_compressed_into`` for models that are not Hugging Face models (the
CNNs of ``compress.conv``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from dsf_runtime.checkpoint import CheckpointError, CompressedCheckpoint, open_compressed
from dsf_runtime.conv.layer import CONV_FACTORS, CompressedConv, conv_entry_problem
from dsf_runtime.conv.modules import replace_conv
from dsf_runtime.modules import replace_linear

__all__ = ["load_compressed_into", "load_conv_layer", "open_conv_checkpoint"]

logger = logging.getLogger(__name__)

_FIX = "the checkpoint does not fit this model; build the model it was compressed from"


def open_conv_checkpoint(directory: str | os.PathLike[str]) -> CompressedCheckpoint:
    """``open_compressed`` plus the checks of every convolution entry (docs/format.md, "Convolution layers"):
    the ``conv`` object, the shape against the geometry, the factor shapes, ``inner_dim`` and ``basis_channels``.

    Raises:
        CheckpointError: naming the file (and tensor) at fault, or the manifest and the layer.
    """
    ckpt = open_compressed(directory)
    for fqn, entry in ckpt.layers.items():
        problem = conv_entry_problem(entry) if entry["kind"] in CONV_FACTORS else None
        if problem:
            raise ckpt.layer_error(fqn, problem)
    return ckpt


def load_conv_layer(ckpt: CompressedCheckpoint, fqn: str, device: torch.device | str = "cpu") -> CompressedConv:
    """Read compressed convolution ``fqn`` on ``device`` (``CompressedCheckpoint.load_layer``, then
    ``CompressedConv.from_layer``).

    Raises:
        CheckpointError: naming the file and tensor at fault, or the manifest and the layer when the entry is not
            a valid convolution.
    """
    layer = ckpt.load_layer(fqn, device)
    try:
        return CompressedConv.from_layer(layer)
    except ValueError as exc:
        raise ckpt.layer_error(fqn, str(exc)) from None


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
    ckpt = open_conv_checkpoint(directory)
    for fqn, entry in ckpt.layers.items():
        if entry["kind"] in CONV_FACTORS:
            replace_conv(model, {fqn: load_conv_layer(ckpt, fqn, device)}, dtype=dtype)
        else:
            replace_linear(model, {fqn: ckpt.load_layer(fqn, device)}, device, dtype)
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
