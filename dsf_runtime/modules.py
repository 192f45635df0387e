"""Modules that hold compressed weights: ``FactorizedLinear`` (``W ≈ A·B``) and ``SparseLinear`` (one ``W``).

Each factor is a ``PackedFactor`` child holding one matrix of ``dsf_runtime.formats`` in any layout, stored
(``csr``, ``bitmask``, ``bsr``, ``dense``) or the GPU kernels' (``nibble``, ``delta``), as tensors named after its
parts (``values`` a frozen parameter, like the ``bias``; the index parts buffers): a ``FactorizedLinear`` at module
path ``P`` has ``P.A.values``, ``P.A.col_idx``, ... and ``P.bias``, so
``model.state_dict()`` matches the directory format whatever the layout. ``forward`` is ``linear`` over the
factors: the Triton kernels when every factor is in a GPU layout on a device where they run, else each factor's
pure-torch ``matmul``. Nothing converts here: ``dsf_runtime.loader`` converts at load time (or ``use_kernels``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dsf_runtime.formats import PackedMatrix
from dsf_runtime.formats.bitmask import CPU_KERNEL_MAX_TOKENS, cpu_linear
from dsf_runtime.layer import CompressedLayer
from dsf_runtime.quantized import dequantize_rows

__all__ = ["CompactLinear", "FactorizedLinear", "Int8Embedding", "PackedFactor", "SparseLinear",
           "int8_embedding_on_meta", "linear", "module_from_layer", "replace_linear"]

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # fallback reasons already logged
_CHUNK_ROWS = 8192  # weight rows made fp32 at a time by CompactLinear's GEMM path (a 576-wide head: 19 MB)


def linear(x: torch.Tensor, factors: Sequence[PackedMatrix], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = F₀·(F₁·(…·x)) + b``, intermediates in fp32: the Triton kernels when every factor is in a GPU layout
    on a device where they run; on the CPU, bitmask factors in one call of the compiled kernel (``cpu_linear``);
    else each factor's ``matmul`` (the pure-torch reference).

    Args:
        x: ``[..., in]`` float16/bfloat16/float32 on the factors' device.
        factors: matrices of ``dsf_runtime.formats`` (any layouts), outermost first.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]`` in ``x.dtype``.
    """
    y = cpu_linear(factors, x)
    if y is None:
        if all(f.kernel_ready(x.device) for f in factors):
            from dsf_runtime.kernels.dispatch import linear as kernel_linear

            return kernel_linear(x, factors, bias, x.dtype)
        h = x
        for f in reversed(factors[1:]):
            h = f.matmul(h, torch.float32)
        y = factors[0].matmul(h, x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """``tensor`` as a parameter without gradient (None stays None): stored weights count in ``parameters()``."""
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)


class PackedFactor(nn.Module):
    """One matrix of ``dsf_runtime.formats`` as tensors named after its parts: ``values`` is a frozen
    ``nn.Parameter`` (so ``num_parameters()`` counts the stored values), the index parts (``col_idx``, ``row_ptr``,
    ``bitmask``, ...) are buffers."""

    def __init__(self, packed: PackedMatrix) -> None:
        super().__init__()
        self.layout = packed.layout
        self.shape = tuple(packed.shape)
        for name, tensor in packed.to_tensors().items():
            if name == "values":
                self.values = _frozen(tensor)
            else:
                self.register_buffer(name, tensor)
        self._packed = packed

    def packed(self) -> PackedMatrix:
        """The matrix over the current tensors (no copy); the same object until a tensor is replaced or converted
        (``.to()``, ``load_state_dict(assign=True)``, a loader's ``setattr``)."""
        cached = self._packed
        tensors = self._parameters, self._buffers  # read directly: nn.Module.__getattr__ costs ~1 µs a part
        for part in cached.stored_parts:
            held = tensors[0].get(part) if part == "values" else tensors[1].get(part)
            if held is not getattr(cached, part):
                current = {p: getattr(self, p) for p in cached.stored_parts}
                cached = self._packed = dataclasses.replace(cached, **current)
                break
        return cached

    def _apply(self, fn, recurse: bool = True):
        # ``.to()`` converts a parameter in place (same object, new data): rebuild the matrix so that nothing keyed
        # on the packed object (kernel caches) sees a stale dtype or device.
        result = super()._apply(fn, recurse)
        self._packed = dataclasses.replace(self._packed, **{p: getattr(self, p) for p in self._packed.stored_parts})
        return result

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={list(self.shape)}, dtype={self._packed.value_format}"


class _CompressedLinear(nn.Module):
    """What ``FactorizedLinear`` and ``SparseLinear`` share: the factor children named in ``_factors``."""

    _factors: tuple[str, ...]

    def factors(self) -> list[PackedMatrix]:
        """The factor matrices, outermost first."""
        return [getattr(self, name).packed() for name in self._factors]

    def set_factors(self, factors: Sequence[PackedMatrix]) -> None:
        """Replace the factors (same shapes, any layouts) and cast the bias to their value dtype."""
        for name, matrix in zip(self._factors, factors, strict=True):
            if tuple(matrix.shape) != getattr(self, name).shape:
                raise ValueError(f"factor {name} is {list(getattr(self, name).shape)}, got {list(matrix.shape)}")
            setattr(self, name, PackedFactor(matrix))
        if self.bias is not None:
            self.bias = _frozen(self.bias.to(factors[0].compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.factors(), self.bias)


class FactorizedLinear(_CompressedLinear):
    """``y = A·(B·x) + b`` with ``A`` [out, r] and ``B`` [r, in]; the intermediate ``B·x`` is fp32.

    Args:
        A, B: matrices of ``dsf_runtime.formats`` (any layouts). bias: ``[out]`` or None.
    Shapes: ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``.
    """

    _factors = ("A", "B")

    def __init__(self, A: PackedMatrix, B: PackedMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"factors do not chain: A is {list(A.shape)}, B is {list(B.shape)}")
        self.in_features, self.out_features, self.inner_dim = B.shape[1], A.shape[0], A.shape[1]
        self.A, self.B = PackedFactor(A), PackedFactor(B)
        self.bias = _frozen(bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, inner_dim={self.inner_dim}"


class SparseLinear(_CompressedLinear):
    """``y = x·Wᵀ + b`` with one ``W`` [out, in] in any layout; ``x`` ``[..., in]`` -> ``[..., out]`` in
    ``x.dtype``."""

    _factors = ("W",)

    def __init__(self, W: PackedMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = W.shape
        self.W = PackedFactor(W)
        self.bias = _frozen(bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class CompactLinear(nn.Module):
    """A dense linear (a tied lm_head) whose weight stays as stored, in 16 bits or as int8 with one scale per row
    (``dsf_runtime.quantized``), while CPU activations are fp32.

    On the CPU with fp32 ``x``, ``y = x·Wᵀ + b`` is computed in fp32 by the compiled kernel
    (``dsf_runtime.kernels.cpu.dense_linear``, which reads the stored weight once) up to ``CPU_KERNEL_MAX_TOKENS``
    tokens; above that (a long prompt's logits) and when traced (``torch.export``, ``torch.compile``: the ONNX
    exporter) by a dense GEMM over fp32 row chunks of the weight. Without the kernel, a 16-bit product runs in the
    weight's dtype (the reason is logged once). Elsewhere (CUDA, a 16-bit ``x``) it is ``F.linear`` in ``x.dtype``,
    over the dequantized weight for int8. The weight is the module's ``weight`` parameter, shared with the
    embedding when tied; the row scales are a non-persistent buffer, shared with an ``Int8Embedding``.

    Shapes: ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None,
                 weight_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        if (weight.dtype == torch.int8) != (weight_scale is not None):
            raise ValueError(f"a {weight.dtype} weight takes {'row scales' if weight.dtype == torch.int8 else 'none'}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.register_buffer("weight_scale", weight_scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.weight_scale
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype == torch.float32:
            return nn.functional.linear(x, w if scale is None else dequantize_rows(w, scale, x.dtype), self.bias)
        if x.numel() > CPU_KERNEL_MAX_TOKENS * self.in_features or torch.compiler.is_compiling():
            y = self._chunked_fp32(x)  # also what torch.export/compile trace (no opaque kernel call)
        else:
            from dsf_runtime.kernels import cpu

            reason = cpu.available()
            if reason is None:
                y = cpu.dense_linear(x.contiguous(), w, scale)
            elif scale is not None:
                y = self._chunked_fp32(x)
            else:
                if reason not in _LOGGED:
                    _LOGGED.add(reason)
                    logger.info("the 16-bit output layer runs in %s on the CPU: %s", w.dtype, reason)
                y = nn.functional.linear(x.to(w.dtype), w).float()
        return y if self.bias is None else y + self.bias.float()

    def _chunked_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Wᵀ`` in fp32 over fp32 copies of ``_CHUNK_ROWS`` rows of ``W`` at a time (one GEMM when traced)."""
        w, scale = self.weight, self.weight_scale
        step = self.out_features if torch.compiler.is_compiling() else _CHUNK_ROWS
        parts = []
        for start in range(0, self.out_features, step):
            rows = w[start : start + step]
            rows = rows.float() if scale is None else dequantize_rows(rows, scale[start : start + step], torch.float32)
            parts.append(nn.functional.linear(x, rows))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        kind = "int8 with row scales" if self.weight_scale is not None else str(self.weight.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={kind}"


class Int8Embedding(nn.Module):
    """An input embedding stored as int8 with one scale per row (``dsf_runtime.quantized``, docs/format.md
    "Quantized tensors"): ``forward`` looks up the int8 rows and multiplies each by its scale.

    Tensors: ``weight`` ``[num_embeddings, dim]`` int8 (a frozen parameter, so a tied output layer shares it),
    ``weight_scale`` ``[num_embeddings]`` float (a buffer).

    Shapes: ``input_ids`` ``[...]`` int64 -> ``[..., dim]`` in the scales' dtype.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight)
        scale = self.weight_scale[input_ids].float().unsqueeze(-1)
        return (rows.float() * scale).to(self.weight_scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 with {self.weight_scale.dtype} row scales"


def int8_embedding_on_meta(model: nn.Module, name: str, scale_dtype: torch.dtype) -> None:
    """Swap ``model``'s input embedding, whose weight is ``name`` (``model.embed_tokens.weight``), for an
    ``Int8Embedding`` over ``meta`` tensors of its shape, for a loader to fill (``weight``, ``weight_scale``).

    Raises:
        ValueError: ``name`` is not the weight of the model's input embedding.
    """
    embedding = model.get_input_embeddings()
    parent, _, attr = name.removesuffix(".weight").rpartition(".")
    if not name.endswith(".weight") or model.get_submodule(name.removesuffix(".weight")) is not embedding:
        raise ValueError(f"'{name}' is stored as int8 rows, but only the input embedding's weight can be")
    rows, cols = embedding.weight.shape
    new = Int8Embedding(torch.empty(rows, cols, dtype=torch.int8, device="meta"),
                        torch.empty(rows, dtype=scale_dtype, device="meta"), getattr(embedding, "padding_idx", None))
    setattr(model.get_submodule(parent) if parent else model, attr, new)


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
