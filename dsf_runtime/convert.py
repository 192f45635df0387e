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
from dsf_runtime.modules import CompactLinear, FactorizedLinear, Int8Embedding, SparseLinear
from dsf_runtime.quantized import dequantize_rows

__all__ = ["compressed_modules", "finish_loading", "float32_activations_on_cpu", "kernel_layer", "use_kernels"]

_HALF = (torch.float16, torch.bfloat16)


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


def _upcast_on_cpu(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a 16-bit input embedding: its CPU output in fp32."""
    return output.float() if output.device.type == "cpu" and output.dtype in _HALF else output


def float32_activations_on_cpu(model: nn.Module) -> nn.Module:
    """Make a model with 16-bit weights compute in fp32 when it runs on the CPU, keeping the weights in 16 bits:
    the input embedding's CPU output is cast to fp32 (a forward hook), and a 16-bit ``nn.Linear`` output layer
    becomes a ``CompactLinear`` over the same parameters (a tied weight stays tied). The compressed linears
    already return ``x.dtype``; norms promote to fp32. On CUDA nothing changes. Returns ``model`` (idempotent).

    Why: CPU arithmetic in fp16/bf16 is slow (no native 16-bit FMA in the vector units torch uses), while the
    weight bytes, which bound decode speed, stay halved (docs/kernels-notes.md).
    """
    embedding = model.get_input_embeddings()
    if isinstance(embedding, Int8Embedding):
        output_dtype = embedding.weight_scale.dtype
    else:
        output_dtype = getattr(getattr(embedding, "weight", None), "dtype", None)
    if output_dtype in _HALF and not getattr(embedding, "_dsf_upcast", False):
        embedding.register_forward_hook(_upcast_on_cpu)
        embedding._dsf_upcast = True
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.dtype in _HALF:
        model.set_output_embeddings(CompactLinear(head.weight, head.bias))
    return model


def _int8_head(model: nn.Module) -> None:
    """An output layer tied to an ``Int8Embedding`` becomes a ``CompactLinear`` over the same int8 weight and row
    scales."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, Int8Embedding) and type(head) is nn.Linear and head.weight is embedding.weight:
        model.set_output_embeddings(CompactLinear(head.weight, head.bias, embedding.weight_scale))


def _dequantize_embedding(model: nn.Module) -> None:
    """Replace an ``Int8Embedding`` (and the ``CompactLinear`` tied to it) by an ``nn.Embedding`` (and a tied
    ``nn.Linear``) holding the dequantized weight in the scales' dtype: what the GPU path runs."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, Int8Embedding):
        return
    weight = nn.Parameter(dequantize_rows(embedding.weight, embedding.weight_scale), requires_grad=False)
    dense = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         device="meta", dtype=weight.dtype)
    dense.weight = weight
    model.set_input_embeddings(dense)
    if isinstance(head, CompactLinear) and head.weight is embedding.weight:
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight, linear.bias = weight, head.bias
        model.set_output_embeddings(linear)


def finish_loading(model: nn.Module, *, float32_on_cpu: bool = True) -> nn.Module:
    """The last step of both loaders, once every tensor is in place. An output layer tied to an int8 input
    embedding computes from the same int8 rows (``CompactLinear``), except on CUDA, where the embedding is
    dequantized once (the GPU kernels have no int8 path; the file stays int8). With ``float32_on_cpu``, 16-bit
    weights compute in fp32 on the CPU (``float32_activations_on_cpu``). Returns ``model``."""
    _int8_head(model)
    if next(model.parameters()).device.type == "cuda":
        _dequantize_embedding(model)
    return float32_activations_on_cpu(model) if float32_on_cpu else model
