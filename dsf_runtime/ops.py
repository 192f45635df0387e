"""Compute with packed weights: ``y = x·Wᵀ`` for one packed matrix and ``y = A·(B·x)`` for DSF factors.

The functions here are pure torch and run on every device without keeping a dense copy of a weight: each call
decompresses the packed matrix in row chunks of at most ``CHUNK_BYTES`` into a temporary and multiplies.

Kernel hook: GPU kernels (``dsf_runtime/kernels/``) plug in behind the same functions with
``register_kernel(op, layout, fn)``; ``op`` is ``"matmul"`` (``fn(x, packed, out_dtype) -> y``, the signature of
``packed_matmul``) or ``"dsf"`` (``fn(x, A, B) -> y`` for factors of one layout, bias excluded). A registered
kernel is used whenever the input is on a CUDA device; the first CUDA call imports ``dsf_runtime.kernels`` once
(when Triton is installed), whose import registers its kernels. Everything else takes the reference path below.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable

import torch

from dsf_runtime.formats import BSRMatrix, PackedMatrix

__all__ = ["CHUNK_BYTES", "dsf_linear", "packed_matmul", "register_kernel", "sparse_linear"]

logger = logging.getLogger(__name__)

# Upper bound on the fp32 temporary that one decompressed chunk of a weight occupies.
CHUNK_BYTES = 64 * 1024 * 1024

_KERNELS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}
_kernels_imported = False


def register_kernel(op: str, layout: str, fn: Callable[..., torch.Tensor]) -> None:
    """Use ``fn`` for ``op`` (``"matmul"`` or ``"dsf"``) on weights of ``layout`` when the input is on CUDA."""
    if op not in ("matmul", "dsf"):
        raise ValueError(f"op must be 'matmul' or 'dsf', got {op!r}")
    _KERNELS[(op, layout)] = fn


def _kernel(op: str, layout: str, x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    global _kernels_imported
    if not x.is_cuda:
        return None
    if not _kernels_imported:
        _kernels_imported = True
        if importlib.util.find_spec("triton") is not None:
            try:
                importlib.import_module("dsf_runtime.kernels")
            except ImportError as exc:
                logger.warning("GPU kernels unavailable, using the pure-torch path: %s", exc)
    return _KERNELS.get((op, layout))


def _compute_dtype(x: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    # fp32 on CPU (half matmuls are slow there) and whenever fp32 is asked for; else the input's half dtype.
    if x.device.type == "cpu" or torch.float32 in (x.dtype, out_dtype):
        return torch.float32
    return x.dtype


def packed_matmul(x: torch.Tensor, weight: PackedMatrix, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = x·Wᵀ`` for a packed ``W`` ``[out, in]``.

    Args:
        x: ``[..., in]``, float16/bfloat16/float32, on the weight's device.
        weight: any packed matrix.
        out_dtype: dtype of ``y`` (default ``x.dtype``).

    Returns:
        ``[..., out]`` in ``out_dtype``.
    """
    out_dtype = out_dtype or x.dtype
    rows, cols = weight.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the {rows}x{cols} weight expects {cols}")
    kernel = _kernel("matmul", weight.layout, x)
    if kernel is not None:
        return kernel(x, weight, out_dtype)
    compute = _compute_dtype(x, out_dtype)
    x2 = x.reshape(-1, cols).to(compute)
    y = torch.empty(x2.shape[0], rows, dtype=compute, device=x.device)
    step = max(1, CHUNK_BYTES // (4 * max(cols, 1)))
    if isinstance(weight, BSRMatrix):
        step = max(weight.block_size, step // weight.block_size * weight.block_size)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        y[:, start:stop] = x2 @ weight.dense_rows(start, stop, compute).T
    return y.to(out_dtype).reshape(*x.shape[:-1], rows)


def dsf_linear(
    x: torch.Tensor, A: PackedMatrix, B: PackedMatrix, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = A·(B·x) + b`` with the intermediate ``B·x`` kept in fp32.

    Args:
        x: ``[..., in]``.
        A: packed ``[out, r]``; B: packed ``[r, in]``.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]`` in ``x.dtype``.
    """
    kernel = _kernel("dsf", A.layout, x) if A.layout == B.layout else None
    if kernel is not None:
        y = kernel(x, A, B)
    else:
        y = packed_matmul(packed_matmul(x, B, torch.float32), A, x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def sparse_linear(x: torch.Tensor, W: PackedMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x·Wᵀ + b`` for one packed ``W`` ``[out, in]``; ``x``: ``[..., in]`` -> ``[..., out]`` in ``x.dtype``."""
    y = packed_matmul(x, W)
    return y if bias is None else y + bias.to(y.dtype)
