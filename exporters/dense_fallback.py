"""Dense fallback: multiply the factors out into an ordinary Hugging Face checkpoint (``dsf export --dense-fallback``).

The result loads with plain ``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM) without this
package: ``config.json`` without ``quantization_config``/``sparsity_config`` (vLLM rejects any sparsity config,
docs/gpu-formats-and-kernels.md §2), ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) with
``<fqn>.weight`` for every linear, and the tokenizer and generation files. It is as large as the dense model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsf_runtime.checkpoint import open_compressed
from dsf_runtime.formats import dtype_name
from exporters._files import atomic_directory, parse_size

__all__ = ["DROPPED_CONFIG_KEYS", "export_dense_fallback"]

logger = logging.getLogger(__name__)

# Keys removed from config.json: their presence makes loaders expect a compressed checkpoint.
DROPPED_CONFIG_KEYS = ("quantization_config", "sparsity_config", "compression_config")
_COPIED = re.compile(r"generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*"
                     r"|merges\.txt|chat_template\..*|spiece\.model")
_INDEX = "model.safetensors.index.json"


def _dense_tensors(src: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of the dense model (``<fqn>.weight``, ``<fqn>.bias`` for every compressed layer, the other
    tensors as stored, floating ones cast to ``dtype``) and the names of the compressed layers."""
    ckpt = open_compressed(src)
    tensors = ckpt.load_tensors(dtype=dtype, dequantize=True)
    for fqn in ckpt.layers:
        layer = ckpt.load_layer(fqn)
        out_dtype = dtype or layer.factors["A" if layer.kind == "dsf" else "W"].compute_dtype
        tensors[f"{fqn}.weight"] = layer.weight(out_dtype).contiguous()
        if layer.bias is not None:
            tensors[f"{fqn}.bias"] = layer.bias.to(dtype or layer.bias.dtype)
    return tensors, list(ckpt.layers)


def _config(src: Path, tensors: dict[str, torch.Tensor], compressed: list[str]) -> dict:
    """``config.json`` without compression keys; untied when a tied ``lm_head`` was compressed on its own."""
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    for key in DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    if config.get("tie_word_embeddings") and "lm_head" in compressed:
        logger.info("lm_head is compressed separately from the embeddings: writing it untied")
        config["tie_word_embeddings"] = False
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        config["dtype"] = dtype_name(float_dtypes.pop())
    return config


def _write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> int:
    """``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards plus the Hugging Face index; returns
    the number of files. Tensors are written in name order and never split."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name in sorted(tensors):
        size = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append({})
            filled = 0
        shards[-1][name] = tensors[name]
        filled += size
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return 1
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / _INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return n


def export_dense_fallback(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GiB",
    overwrite: bool = False,
) -> Path:
    """Write the dense Hugging Face checkpoint that ``src`` represents (``W = A·B`` computed in fp32).

    Args:
        src: a compressed directory (any layout).
        dst: the new directory; built under a temporary name next to it and renamed into place.
        dtype: dtype of every floating tensor; None keeps the stored dtypes (weights take their factors' dtype).
        max_shard_size: above this many bytes the tensors go to shards plus ``model.safetensors.index.json``.
        overwrite: replace a non-empty ``dst``.

    Returns:
        ``dst`` as a Path.

    Raises:
        CheckpointError: ``src`` is incomplete or invalid. FileExistsError: ``dst`` is not empty and
        ``overwrite`` is False. ValueError: ``dst`` overlaps ``src`` or a bad ``max_shard_size``.
    """
    src, dst = Path(src), Path(dst)
    max_bytes = parse_size(max_shard_size)
    with atomic_directory(dst, overwrite=overwrite, sources=(src,)) as staging:
        tensors, compressed = _dense_tensors(src, dtype)
        config = _config(src, tensors, compressed)
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for path in sorted(src.iterdir()):
            if path.is_file() and _COPIED.fullmatch(path.name):
                shutil.copy2(path, staging / path.name)
        files = _write_safetensors(staging, tensors, max_bytes)
    logger.info("dense fallback %s -> %s (%d layers multiplied out, %d file(s))", src, dst, len(compressed), files)
    return dst
