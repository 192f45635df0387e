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

__all__ = ["FactorizedLinear", "HalfWeightLinear", "PackedFactor", "SparseLinear", "linear", "module_from_layer",
           "replace_linear"]

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # fallback reasons already logged


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
        for part in cached.parts:
            held = tensors[0].get(part) if part == "values" else tensors[1].get(part)
            if held is not getattr(cached, part):
                current = {p: getattr(self, p) for p in cached.parts}
                cached = self._packed = dataclasses.replace(cached, **current)
                break
        return cached

    def _apply(self, fn, recurse: bool = True):
        # ``.to()`` converts a parameter in place (same object, new data): rebuild the matrix so that nothing keyed
        # on the packed object (kernel caches) sees a stale dtype or device.
        result = super()._apply(fn, recurse)
        self._packed = dataclasses.replace(self._packed, **{p: getattr(self, p) for p in self._packed.parts})
        return result

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={list(self.shape)}, dtype={self.values.dtype}"


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
            self.bias = _frozen(self.bias.to(factors[0].dtype))

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


class HalfWeightLinear(nn.Module):
    """A dense linear (a tied lm_head) whose weight stays in 16 bits while CPU activations are fp32.

    On the CPU with fp32 ``x`` and a 16-bit weight, ``y = x·Wᵀ + b`` is computed in fp32 by the compiled kernel
    (``dsf_runtime.kernels.cpu.half_linear``, which reads the 16-bit weight once) up to ``CPU_KERNEL_MAX_TOKENS``
    tokens, and by a dense fp32 GEMM over a temporary fp32 copy above that (a long prompt's logits) and when traced
    (``torch.export``, ``torch.compile``: the ONNX exporter). Without the
    kernel, the product runs in the weight's dtype (the reason is logged once). Elsewhere it is ``F.linear``.
    The weight is the module's ``weight`` parameter, shared with the embedding when tied.

    Shapes: ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype == torch.float32:
            return nn.functional.linear(x, w, self.bias)
        if x.numel() > CPU_KERNEL_MAX_TOKENS * self.in_features or torch.compiler.is_compiling():
            y = nn.functional.linear(x, w.float())  # also what torch.export/compile trace (no opaque kernel call)
        else:
            from dsf_runtime.kernels import cpu

            reason = cpu.available()
            if reason is None:
                y = cpu.half_linear(x.contiguous(), w)
            else:
                if reason not in _LOGGED:
                    _LOGGED.add(reason)
                    logger.info("the 16-bit output layer runs in %s on the CPU: %s", w.dtype, reason)
                y = nn.functional.linear(x.to(w.dtype), w).float()
        return y if self.bias is None else y + self.bias.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


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
