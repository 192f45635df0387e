"""Convert a compressed model directory to another layout and/or value dtype (``dsf export --output``).

Every compressed layer is read (and validated) from the source, unpacked in its stored dtype and packed again:
DSF factors through ``pack_factors``, which drops inner indices whose ``A`` column or ``B`` row is all zero (layout
``dense`` keeps them), so converting ``csr`` to ``dense`` and back reproduces every tensor bit for bit. The other
tensors are copied (floating ones cast to ``--dtype``; the input embedding as int8 rows unless ``--embedding keep``,
``dsf_runtime.quantized``), and so are ``config.json``, ``generation_config.json`` and
the tokenizer files. The destination appears complete or not at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from compress.quantize import quantize_embedding
from dsf_runtime.checkpoint import CompressedLayer, open_compressed, save_compressed
from dsf_runtime.formats import AUTO, AUTO_LAYOUTS, pack
from dsf_runtime.quantized import input_embedding_name
from exporters._files import atomic_directory
from exporters.config import ExportConfig

__all__ = ["convert_layer", "convert_layout"]

logger = logging.getLogger(__name__)


def convert_layer(layer: CompressedLayer, config: ExportConfig) -> CompressedLayer:
    """``layer`` repacked into ``config.layout`` with values (and bias) in ``config.dtype`` (None: stored dtype).

    DSF inner indices that are empty after the cast are dropped unless the layout is ``dense``. Quantized values
    (codes with row or int4 group scales) keep each factor's codes bit for bit in ``auto``/``bitmask``/``csr``/
    ``dense``, and are decoded into floats for a ``--dtype`` or another layout.
    """
    dtype = config.torch_dtype
    bias = layer.bias if layer.bias is None or dtype is None else layer.bias.to(dtype)
    common = dict(method=layer.method, bias=bias, error=layer.error, relative_error=layer.relative_error,
                  layout=config.layout, **config.layout_options())
    quantized = [f for f in layer.factors.values() if f.quantized]
    if quantized and dtype is None and config.layout in (AUTO, *AUTO_LAYOUTS):  # each factor's codes as they are
        factors = {name: pack(f.dense_codes(), config.layout, **f.code_options()) if f.quantized
                   else pack(f.to_dense(), config.layout) for name, f in layer.factors.items()}
        return CompressedLayer(layer.kind, layer.shape, factors, layer.method, bias, layer.error, layer.relative_error)
    if quantized and dtype is None:  # a layout without codes: decoded into the scales' dtype
        dtype = quantized[0].compute_dtype
        bias = layer.bias if layer.bias is None else layer.bias.to(dtype)
        common["bias"] = bias
    factors = {name: f.to_dense() for name, f in layer.factors.items()}
    return CompressedLayer.from_dense(layer.kind, factors, dtype=dtype, **common)


def convert_layout(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: ExportConfig,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``src`` (a compressed directory, any layout) to ``dst`` in ``config.layout``.

    Args:
        src: a directory written by ``dsf compress`` or ``dsf export``.
        dst: the new directory; built under a temporary name next to it and renamed into place.
        config: layout, dtype, bsr block size and shard size.
        overwrite: replace a non-empty ``dst``.

    Returns:
        ``dst`` as a Path.

    Raises:
        CheckpointError: ``src`` is incomplete or holds an invalid tensor (the message names file and tensor).
        FileExistsError: ``dst`` is not empty and ``overwrite`` is False.
        ValueError: ``dst`` overlaps ``src``.
    """
    src, dst = Path(src), Path(dst)
    ckpt = open_compressed(src)
    with atomic_directory(dst, overwrite=overwrite, sources=(src,)) as staging:
        layers = {fqn: convert_layer(ckpt.load_layer(fqn), config) for fqn in ckpt.layers}
        tensors = ckpt.load_tensors(dtype=config.torch_dtype)
        if config.embedding == "int8":
            tensors = quantize_embedding(tensors, input_embedding_name(meta_model(src)))
        info = {key: ckpt.manifest.get(key) for key in ("base_model", "architecture", "compression")}
        save_compressed(staging, tensors=tensors, layers=layers, config_source=src, info=info,
                        max_shard_bytes=config.max_shard_bytes)
    logger.info("exported %s -> %s (%d layers, layout %s)", src, dst, len(layers), config.layout)
    return dst


def meta_model(directory: Path):
    """The causal LM of ``directory/config.json`` on the ``meta`` device (no memory), to look up module names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
