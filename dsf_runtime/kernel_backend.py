"""The bridge between the runtime modules and the Triton kernels of ``dsf_runtime.kernels``.

The modules (``dsf_runtime.modules``) hold either packed matrices (the directory's formats, computed by the
pure-torch ``dsf_runtime.ops``) or, after ``FactorizedLinear.to_kernels`` / ``SparseLinear.to_kernels``, kernel
matrices (``dsf_runtime.kernels.KernelMatrix``: layouts ``nibble``, ``delta``, ``dense``) computed here. Triton
is imported only when a kernel is first needed, so the runtime keeps working on machines without it.

* ``unavailable_reason(device)``: why the kernels cannot run on ``device`` (None when they can).
* ``prepare(packed, dtype)``: convert one packed matrix once (``prepare_factor``, on the matrix's device).
* ``dsf_linear`` / ``sparse_linear``: the kernel forward of the modules; no host sync and no data-dependent
  allocation for up to ``configs.DECODE_MAX_TOKENS`` tokens, so a CUDA graph can capture it after ``warmup``.
* ``use_kernels(model)``: convert every packed module of a model in place; ``warmup(model, tokens)``: compile the
  kernels of every distinct layer signature for the token counts a graph will capture.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["dsf_linear", "prepare", "sparse_linear", "unavailable_reason", "use_kernels", "warmup"]

logger = logging.getLogger(__name__)

_dispatch: ModuleType | None = None


def _kernels() -> ModuleType:
    """``dsf_runtime.kernels.dispatch`` (imported once; importing the package registers the ops hook)."""
    global _dispatch
    if _dispatch is None:
        importlib.import_module("dsf_runtime.kernels")
        _dispatch = importlib.import_module("dsf_runtime.kernels.dispatch")
    return _dispatch


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can.

    They run on CUDA devices when Triton is installed, and on the CPU only when the kernels were imported under
    ``TRITON_INTERPRET=1`` (tests).
    """
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'dsf-toolkit[gpu]')"
    try:
        dispatch = _kernels()
    except Exception as exc:  # noqa: BLE001 - any import failure means: no kernels, say why
        return f"importing dsf_runtime.kernels failed: {type(exc).__name__}: {exc}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not dispatch.kernels_available(device):
        return f"the kernels run on CUDA devices (on the CPU only under TRITON_INTERPRET=1), not on {device}"
    return None


def prepare(packed: Any, dtype: torch.dtype | None = None) -> Any:
    """Convert a packed matrix (``dsf_runtime.formats``) to a ``KernelMatrix`` with values in ``dtype``.

    The layout is chosen by ``prepare_factor(layout="auto")``: ``nibble`` for balanced masks, ``delta`` for
    unstructured ones, ``dense`` when sparsity saves too little. Runs on the matrix's device and needs a dense
    temporary of the matrix there.
    """
    return _kernels().prepare_factor(packed, dtype=dtype or packed.dtype)


def _cast_bias(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None or bias.dtype == dtype else bias.to(dtype)


def dsf_linear(x: torch.Tensor, kA: Any, kB: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = A·(B·x) + b`` with kernel matrices ``A`` [out, r], ``B`` [r, in]; ``x`` [..., in] -> [..., out].

    ``x`` is cast to the factors' value dtype when it differs (and ``y`` back to ``x.dtype``).
    """
    mm = _kernels().factorized_matmul
    if x.dtype != kA.dtype:
        return mm(x.to(kA.dtype), kA, kB, _cast_bias(bias, kA.dtype)).to(x.dtype)
    return mm(x, kA, kB, _cast_bias(bias, kA.dtype))


def sparse_linear(x: torch.Tensor, kW: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x·Wᵀ + b`` with a kernel matrix ``W`` [out, in]; dtypes as ``dsf_linear``."""
    mm = _kernels().sparse_matmul
    if x.dtype != kW.dtype:
        return mm(x.to(kW.dtype), kW, _cast_bias(bias, kW.dtype)).to(x.dtype)
    return mm(x, kW, _cast_bias(bias, kW.dtype))


def _compressed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from dsf_runtime.modules import FactorizedLinear, SparseLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, SparseLinear))]


def use_kernels(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Convert every packed ``FactorizedLinear``/``SparseLinear`` of ``model`` to kernel matrices, in place.

    Each module then holds only the kernel representation (its packed buffers are released). Returns the number of
    modules converted.

    Raises:
        RuntimeError: the kernels cannot run where the model's weights are (``unavailable_reason``).
    """
    converted = 0
    for name, module in _compressed_modules(model):
        if module.uses_kernels:
            continue
        reason = unavailable_reason(module.device)
        if reason:
            raise RuntimeError(f"cannot convert '{name}' for the kernels: {reason}; keep the packed modules "
                               "(pure-torch path) or move the model to a CUDA device first")
        module.to_kernels(dtype)
        converted += 1
    return converted


def _signature(module: nn.Module) -> tuple:
    factors = [module.A, module.B] if hasattr(module, "A") else [module.W]
    return (type(module).__name__, module.bias is not None,
            *[(f.layout, f.shape, f.per_group, f.group, f.values.dtype, tuple(f.values.shape)) for f in factors])


@torch.inference_mode()
def warmup(model: nn.Module, tokens: tuple[int, ...] = (1,), dtype: torch.dtype | None = None) -> int:
    """Run one forward per distinct kernel layer signature and token count, so that the Triton kernels are
    compiled before a CUDA graph captures these token counts. Returns the number of forwards run.

    Args:
        model: a model whose compressed modules were converted (``use_kernels`` or ``from_pretrained`` on CUDA).
        tokens: token counts (batch × new tokens per step) the model will run with.
        dtype: activation dtype (default: each layer's value dtype).
    """
    seen, runs = set(), 0
    for _, module in _compressed_modules(model):
        if not module.uses_kernels:
            continue
        sig = _signature(module)
        if sig in seen:
            continue
        seen.add(sig)
        for t in tokens:
            x = torch.zeros(t, module.in_features, dtype=dtype or module.value_dtype, device=module.device)
            module(x)
            runs += 1
    return runs
