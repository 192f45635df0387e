"""Modules that hold compressed weights: ``FactorizedLinear`` (``W ≈ A·B``) and ``SparseLinear`` (one ``W``).

Each factor is a child module in one of two representations, never both:

* ``PackedFactor`` (CPU, and CUDA without Triton): the directory's packed formats. Buffers have the directory's
  tensor names: a ``FactorizedLinear`` at module path ``P`` has ``P.A.values``, ``P.A.col_idx``, ``P.A.row_ptr``,
  ... and ``P.bias``, so ``model.state_dict()`` matches the file. Forward calls the pure-torch ``dsf_runtime.ops``.
* ``KernelFactor`` (CUDA, after ``to_kernels``; ``from_pretrained`` converts at load time): the Triton kernels'
  layout (``dsf_runtime.kernels.KernelMatrix``). Buffers are ``P.A.values`` (layout-specific shape),
  ``P.A.index`` (uint8; ``nibble``/``delta``) and ``P.A.row_ptr`` (int32; ``delta``), so the state dict of a
  converted model does NOT match the directory format; save compressed models from the packed layers instead.
  Forward calls ``dsf_runtime.kernel_backend`` (no host sync, CUDA-graph capturable after ``warmup``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dsf_runtime import kernel_backend, ops
from dsf_runtime.formats import LAYOUTS, PackedMatrix
from dsf_runtime.layer import CompressedLayer

__all__ = ["FactorizedLinear", "KernelFactor", "PackedFactor", "SparseLinear", "module_from_layer", "replace_linear"]

KERNEL_PARTS = ("values", "index", "row_ptr")  # the tensors of a KernelMatrix, in this order


class PackedFactor(nn.Module):
    """One packed matrix as buffers named after its parts (``values``, ``col_idx``, ``row_ptr``, ``bitmask``)."""

    def __init__(self, packed: PackedMatrix) -> None:
        super().__init__()
        self.layout = packed.layout
        self.shape = tuple(packed.shape)
        for name, tensor in packed.to_tensors().items():
            self.register_buffer(name, tensor)
        self._packed: PackedMatrix | None = None

    def packed(self) -> PackedMatrix:
        """The packed matrix over the current buffers (no copy). The same object is returned until a buffer is
        replaced (``.to()``, ``load_state_dict(assign=True)``), so kernels may cache per-object conversions."""
        cls = LAYOUTS[self.layout]
        cached = self._packed
        if cached is None or any(getattr(cached, p) is not getattr(self, p) for p in cls.parts):
            cached = self._packed = cls(**{p: getattr(self, p) for p in cls.parts}, shape=self.shape)
        return cached

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={list(self.shape)}, dtype={self.values.dtype}"


class KernelFactor(nn.Module):
    """One factor in a Triton kernel layout (a ``dsf_runtime.kernels.KernelMatrix``) as buffers ``values``,
    ``index`` (``nibble``/``delta``) and ``row_ptr`` (``delta``); see ``dsf_runtime.kernels.layouts``."""

    def __init__(self, kernel: Any) -> None:
        super().__init__()
        if not all(hasattr(kernel, a) for a in (*KERNEL_PARTS, "layout", "group", "per_group", "nnz")):
            raise TypeError(f"expected a dsf_runtime.kernels.KernelMatrix, got {type(kernel).__name__}; convert "
                            "packed matrices with dsf_runtime.kernel_backend.prepare")
        self.layout = kernel.layout
        self.shape = tuple(kernel.shape)
        self.group, self.per_group, self.nnz = kernel.group, kernel.per_group, kernel.nnz
        for name in KERNEL_PARTS:
            if getattr(kernel, name) is not None:
                self.register_buffer(name, getattr(kernel, name))
        self._kernel = kernel

    def kernel(self) -> Any:
        """The ``KernelMatrix`` over the current buffers (no copy); rebuilt only after a buffer was replaced
        (``.to()``, ``load_state_dict(assign=True)``)."""
        cached = self._kernel
        current = {p: getattr(self, p, None) for p in KERNEL_PARTS}
        if any(getattr(cached, p) is not t for p, t in current.items()):
            cached = self._kernel = dataclasses.replace(cached, **current)
        return cached

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={list(self.shape)}, dtype={self.values.dtype}"


def _factor_module(factor: Any) -> PackedFactor | KernelFactor:
    """``PackedFactor`` for a packed matrix of ``dsf_runtime.formats``, ``KernelFactor`` for a ``KernelMatrix``."""
    return PackedFactor(factor) if hasattr(factor, "to_tensors") else KernelFactor(factor)


class _CompressedLinear(nn.Module):
    """What ``FactorizedLinear`` and ``SparseLinear`` share: the factor children named in ``_factors``."""

    _factors: tuple[str, ...]

    @property
    def uses_kernels(self) -> bool:
        """True when the factors are kernel matrices (Triton path), False when packed (pure-torch path)."""
        return isinstance(getattr(self, self._factors[0]), KernelFactor)

    @property
    def device(self) -> torch.device:
        return getattr(self, self._factors[0]).values.device

    @property
    def value_dtype(self) -> torch.dtype:
        return getattr(self, self._factors[0]).values.dtype

    def to_kernels(self, dtype: torch.dtype | None = None) -> _CompressedLinear:
        """Convert the packed factors once to the kernels' layouts (on their device, values in ``dtype``, default
        their own) and drop the packed buffers; the bias is cast to the same dtype. Returns ``self``."""
        if self.uses_kernels:
            return self
        for name in self._factors:
            setattr(self, name, KernelFactor(kernel_backend.prepare(getattr(self, name).packed(), dtype)))
        if self.bias is not None:
            self.bias = self.bias.to(self.value_dtype)
        return self


class FactorizedLinear(_CompressedLinear):
    """``y = A·(B·x) + b`` with ``A`` [out, r] and ``B`` [r, in]; the intermediate ``B·x`` is fp32.

    Args:
        A, B: both packed matrices (``dsf_runtime.formats``) or both ``KernelMatrix``. bias: ``[out]`` or None.
    Shapes: ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``.
    """

    _factors = ("A", "B")

    def __init__(self, A: PackedMatrix | Any, B: PackedMatrix | Any, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"factors do not chain: A is {list(A.shape)}, B is {list(B.shape)}")
        self.in_features, self.out_features, self.inner_dim = B.shape[1], A.shape[0], A.shape[1]
        self.A, self.B = _factor_module(A), _factor_module(B)
        if type(self.A) is not type(self.B):
            raise TypeError(f"A is a {type(self.A).__name__} but B a {type(self.B).__name__}; pass both packed or "
                            "both converted (kernel_backend.prepare)")
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.A, KernelFactor):
            return kernel_backend.dsf_linear(x, self.A.kernel(), self.B.kernel(), self.bias)
        return ops.dsf_linear(x, self.A.packed(), self.B.packed(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, inner_dim={self.inner_dim}"


class SparseLinear(_CompressedLinear):
    """``y = x·Wᵀ + b`` with one ``W`` [out, in] (packed or ``KernelMatrix``); ``x`` ``[..., in]`` -> ``[..., out]``
    in ``x.dtype``."""

    _factors = ("W",)

    def __init__(self, W: PackedMatrix | Any, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = W.shape
        self.W = _factor_module(W)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.W, KernelFactor):
            return kernel_backend.sparse_linear(x, self.W.kernel(), self.bias)
        return ops.sparse_linear(x, self.W.packed(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def module_from_layer(
    layer: CompressedLayer,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    kernels: bool = False,
) -> FactorizedLinear | SparseLinear:
    """The module for a compressed layer, its tensors moved to ``device`` and values/bias cast to ``dtype``.

    ``kernels=True`` converts the factors for the Triton kernels right away (``to_kernels``), so the module holds
    only the kernel layout; the packed copies are released when the caller drops ``layer``.
    """
    layer = layer.to(device, dtype)
    if layer.kind == "dsf":
        module = FactorizedLinear(layer.factors["A"], layer.factors["B"], layer.bias)
    else:
        module = SparseLinear(layer.factors["W"], layer.bias)
    return module.to_kernels() if kernels else module


def replace_linear(
    model: nn.Module,
    layers: Mapping[str, CompressedLayer],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    kernels: bool = False,
) -> nn.Module:
    """Swap each module named in ``layers`` (an ``nn.Linear`` of the layer's shape, possibly on ``meta``) for a
    ``FactorizedLinear``/``SparseLinear`` on ``device`` with values in ``dtype`` (``kernels``: converted for the
    Triton kernels, see ``module_from_layer``); returns ``model``.

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
        setattr(model.get_submodule(parent_name), child, module_from_layer(layer, device, dtype, kernels=kernels))
    return model
