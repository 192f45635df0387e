"""Plug the kernels into ``dsf_runtime.ops`` (its ``register_kernel`` hook) for CUDA inputs.

``ops`` passes the packed matrices of ``dsf_runtime.formats`` on every call; they are converted once with
``prepare_factor`` (layout ``"auto"``, values in the activation dtype) and the result is cached per packed object
(weakly: it goes away with the packed matrix). The first call of a layer therefore converts, and must not happen
inside a CUDA-graph capture: run one eager forward (or ``kernels.warmup``) first.

This is the fallback for packed matrices that reach ``ops`` on CUDA (e.g. a model loaded on the CPU and then
moved with ``.cuda()``): the converted copy lives next to the packed one. ``from_pretrained(..., device="cuda")``
and ``dsf_runtime.kernel_backend.use_kernels(model)`` convert the modules instead, keeping one representation.
"""

from __future__ import annotations

import logging
import weakref

import torch

from dsf_runtime.kernels.dispatch import factorized_matmul, prepare_factor, sparse_matmul
from dsf_runtime.kernels.layouts import KernelMatrix

__all__ = ["kernel_matrix", "register"]

log = logging.getLogger(__name__)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_warned = False
LAYOUTS = ("csr", "bitmask", "bsr", "dense")


def kernel_matrix(packed, dtype: torch.dtype) -> KernelMatrix:
    """The cached ``KernelMatrix`` of a packed matrix in ``dtype`` (converted on first use)."""
    global _warned
    k = _CACHE.get(packed)
    if k is None or k.dtype != dtype:
        if not _warned:
            _warned = True
            log.warning("converting packed weights on first CUDA use and keeping both copies; load with "
                        "from_pretrained(..., device='cuda') or call dsf_runtime.kernel_backend.use_kernels(model) "
                        "to keep only the kernel layout")
        k = prepare_factor(packed, dtype=dtype)
        _CACHE[packed] = k
        log.debug("prepared %s %s as %s", packed.layout, tuple(packed.shape), k.layout)
    return k


def _matmul(x: torch.Tensor, packed, out_dtype: torch.dtype) -> torch.Tensor:
    y = sparse_matmul(x, kernel_matrix(packed, x.dtype))
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _dsf(x: torch.Tensor, A, B) -> torch.Tensor:
    return factorized_matmul(x, kernel_matrix(A, x.dtype), kernel_matrix(B, x.dtype))


def register() -> bool:
    """Register the kernels with ``dsf_runtime.ops`` if it offers ``register_kernel``; returns whether it did."""
    try:
        from dsf_runtime import ops
    except ImportError:  # pragma: no cover - runtime without ops
        return False
    if not hasattr(ops, "register_kernel"):
        return False
    for layout in LAYOUTS:
        ops.register_kernel("matmul", layout, _matmul)
        ops.register_kernel("dsf", layout, _dsf)
    return True
