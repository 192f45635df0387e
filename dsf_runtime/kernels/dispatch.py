"""The route from a chain of GPU-layout matrices to the Triton kernels: ``linear(x, factors, bias)`` computes
``y = F₀·(F₁·(…·x)) + b`` (one factor: a sparse layer; two: a DSF layer ``A·(B·x)``) with the path chosen by the
token count. Factors are ``nibble``/``delta``/``tile``/``dense`` matrices of ``dsf_runtime.formats`` (read through
their named tensors; this module does not import the formats).

Paths (``path=``, default ``"auto"``):

- ``"decode"``: the streaming kernels, fp32 intermediate ``B·x``: one launch per factor (``nibble_matmul`` /
  ``delta_matmul``) handing ``B·x`` over in the packed activation layout, plus one to pack the tokens when there
  are several. No host sync, no data-dependent allocation: CUDA-graph capturable.
- ``"prefill"``: decompress each factor to a dense temporary (Triton) and multiply with cuBLAS; the intermediate is
  rounded to the activation dtype (cuBLAS has no fp16×fp32 GEMM). The only path for ``dense`` factors.
- ``"materialize"``: ``W = A·B`` (dense temporary), then one GEMM: fewer FLOPs once tokens > max(out, in).
- ``"tile"``: the tensor-core kernel over ``tile`` factors (``tile_matmul``), one launch per factor, the
  intermediate rounded to the weights' dtype. Unmeasured on a GPU so far: ``auto`` takes it only for factors
  stored as ``tile`` (up to ``TILE_MAX_TOKENS`` tokens, else ``"prefill"``), which no loader or export chooses by
  default.

``"auto"`` takes ``"decode"`` up to ``configs.DECODE_MAX_TOKENS`` tokens, ``"materialize"`` when its FLOP count is
lower, ``"prefill"`` otherwise. The first call of a new shape and token count compiles: run it once before a
CUDA-graph capture (``dsf_runtime.loader.warmup``). Paths measured and rejected (a fused two-factor decode kernel,
a side-stream chunked prefill) are described in docs/kernels-notes.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dsf_runtime.kernels import _interpreter_compat, configs
from dsf_runtime.kernels._io import token_block
from dsf_runtime.kernels.delta_matmul import _delta_matmul_kernel, delta_matmul
from dsf_runtime.kernels.delta_unpack import delta_unpack
from dsf_runtime.kernels.nibble_matmul import nibble_matmul
from dsf_runtime.kernels.nibble_unpack import nibble_unpack
from dsf_runtime.kernels.pack_activations import pack_activations
from dsf_runtime.kernels.tile_matmul import tile_matmul
from dsf_runtime.kernels.tile_unpack import tile_unpack

__all__ = ["PATHS", "interpreted", "linear"]

_interpreter_compat.apply()

PATHS = ("auto", "decode", "prefill", "materialize", "tile")
TILE_MAX_TOKENS = 256  # "auto" on tile factors: the tile kernel up to here (issue 10's range), then "prefill"
_STREAM = {"nibble": nibble_matmul, "delta": delta_matmul}  # the decode kernel of each sparse layout


def interpreted() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_delta_matmul_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------- paths
def _per_row(k: Any) -> int:
    """Stored slots per row: ``S`` (nibble) or the average entries per row (delta); the tuning key."""
    return k.slots if k.layout == "nibble" else k.slots // max(k.shape[0], 1)


def _decode(x2: torch.Tensor, factors: Sequence[Any], bias: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    """Stream ``x2`` through the factors (last first: ``[A, B]`` computes ``A·(B·x)``), one token per program up to
    ``configs.DECODE_BN1_MAX_TOKENS`` tokens, else ``token_block`` tokens packed per program."""
    T = x2.shape[0]
    bn = 1 if T <= configs.DECODE_BN1_MAX_TOKENS else token_block(T)
    first = factors[-1]
    xf32 = bool(configs.lookup(first.layout, first.shape[0], _per_row(first), bn).get("XF32"))
    h = x2 if bn == 1 else pack_activations(x2, bn, dtype=torch.float32 if xf32 else None)
    for i, k in enumerate(reversed(factors)):
        last = i == len(factors) - 1
        cfg = configs.lookup(k.layout, k.shape[0], _per_row(k), bn)
        h = _STREAM[k.layout](h, k, bias if last else None, n_tokens=T, out_dtype=out_dtype if last else torch.float32,
                              packed_out=0 if last else bn, config=cfg)
    return h


def _dense_of(k: Any, dtype: torch.dtype) -> torch.Tensor:
    """``k`` as a dense ``[rows, cols]`` temporary in ``dtype`` (the Triton unpack kernels for sparse layouts; the
    ``nibble`` unpack decodes codes in registers: code · scale is exact before the one rounding)."""
    if k.layout == "nibble":
        return nibble_unpack(k, dtype=dtype, **configs.unpack_config(k.shape[0], k.slots))
    if k.layout == "delta":
        return delta_unpack(k, dtype=dtype)
    if k.layout == "tile":
        return tile_unpack(k, dtype=dtype)
    return k.values if k.values.dtype == dtype else k.values.to(dtype)


def _prefill(x2: torch.Tensor, factors: Sequence[Any], bias: torch.Tensor | None) -> torch.Tensor:
    """Decompress each factor to a dense temporary and multiply with cuBLAS, last factor first."""
    h = x2
    for i, k in enumerate(reversed(factors)):
        h = F.linear(h, _dense_of(k, x2.dtype), bias if i == len(factors) - 1 else None)
    return h


def _materialize(x2: torch.Tensor, factors: Sequence[Any], bias: torch.Tensor | None) -> torch.Tensor:
    """``W = F₀·F₁·…`` as one dense temporary, then one GEMM."""
    W = _dense_of(factors[0], x2.dtype)
    for k in factors[1:]:
        W = W @ _dense_of(k, x2.dtype)
    return F.linear(x2, W, bias)


def _tile(x2: torch.Tensor, factors: Sequence[Any], bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``tile_matmul`` through the factors, last first; intermediates in the weights' dtype."""
    h = x2
    for i, k in enumerate(reversed(factors)):
        last = i == len(factors) - 1
        h = tile_matmul(h, k, bias if last else None, out_dtype=out_dtype if last else k.dtype)
    return h


def _choose_path(tokens: int, factors: Sequence[Any]) -> str:
    m, n = factors[0].shape[0], factors[-1].shape[1]
    if all(k.layout == "tile" for k in factors):
        return "tile" if tokens <= TILE_MAX_TOKENS else "prefill"
    if any(k.layout not in _STREAM for k in factors):
        return "prefill"
    if tokens <= configs.DECODE_MAX_TOKENS:
        return "decode"
    if len(factors) == 2:
        r = factors[0].shape[1]
        if m * r * n + tokens * m * n < tokens * (m * r + r * n):
            return "materialize"
    return "prefill"


def _check(x: torch.Tensor, factors: Sequence[Any], bias: torch.Tensor | None, path: str) -> None:
    m, n = factors[0].shape[0], factors[-1].shape[1]
    dev, dtype = factors[0].values.device, factors[0].compute_dtype
    for outer, inner in zip(factors, factors[1:]):
        if outer.shape[1] != inner.shape[0]:
            raise ValueError(f"factors do not chain: {list(outer.shape)} then {list(inner.shape)}")
    for k in factors:
        if k.values.device != dev or k.compute_dtype != dtype:
            raise ValueError(f"factors must share one device and compute dtype, got {dev}/{dtype} and "
                             f"{k.values.device}/{k.compute_dtype}")
        if k.quantized and k.layout != "nibble":
            raise ValueError(f"the {k.layout!r} kernels read float values; decode its codes first (kernel_layout)")
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"x must be [..., {n}], got {list(x.shape)}")
    if x.device != dev:
        raise ValueError(f"x is on {x.device} but the factors are on {dev}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if bias is not None and (tuple(bias.shape) != (m,) or bias.device != dev):
        raise ValueError(f"bias must be [{m}] on {dev}, got {list(bias.shape)} on {bias.device}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if path == "decode" and any(k.layout not in _STREAM for k in factors):
        raise ValueError(f"path 'decode' needs {sorted(_STREAM)} factors, got {[k.layout for k in factors]}")
    if path == "tile" and any(k.layout != "tile" for k in factors):
        raise ValueError(f"path 'tile' needs 'tile' factors, got {[k.layout for k in factors]}")


def linear(x: torch.Tensor, factors: Sequence[Any], bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, *, path: str = "auto") -> torch.Tensor:
    """``y = F₀·(F₁·(…·x)) + b`` on the Triton kernels.

    Args:
        x: ``[..., in]`` float16/bfloat16/float32 on the factors' device; cast to the factors' compute dtype.
        factors: ``nibble``/``delta``/``tile``/``dense`` matrices (``dsf_runtime.formats``), outermost first, one compute
            dtype (the values', or the scales' of ``nibble`` codes).
        bias: ``[out]`` or None, added in the factors' compute dtype.
        out_dtype: dtype of ``y`` (default ``x.dtype``).
        path: see the module docstring.

    Returns:
        ``[..., out]`` in ``out_dtype``.

    Raises:
        ValueError / TypeError: shapes that do not chain, mixed devices or dtypes, an unknown path.
    """
    _check(x, factors, bias, path)
    m, n = factors[0].shape[0], factors[-1].shape[1]
    dtype = factors[0].compute_dtype
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, n).to(dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    path = _choose_path(x2.shape[0], factors) if path == "auto" else path
    if x2.shape[0] == 0:
        y = x2.new_empty(0, m, dtype=out_dtype)
    elif path == "decode":
        y = _decode(x2, factors, bias, out_dtype if out_dtype in (dtype, torch.float32) else dtype)
    elif path == "materialize":
        y = _materialize(x2, factors, bias)
    elif path == "tile":
        y = _tile(x2, factors, bias, out_dtype if out_dtype in (dtype, torch.float32) else dtype)
    else:
        y = _prefill(x2, factors, bias)
    return y.to(out_dtype).reshape(*x.shape[:-1], m)
