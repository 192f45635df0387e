"""Argument checks and output allocation shared by the matmul wrappers (``nibble_matmul``, ``delta_matmul``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from dsf_runtime.kernels.configs import lookup
from dsf_runtime.kernels.pack_activations import pack_activations

__all__ = ["Launch", "plan_launch", "token_block"]


def token_block(n_tokens: int) -> int:
    """Default tokens per program: 1 for one token, else the next power of two up to 16."""
    return 1 if n_tokens <= 1 else min(16, triton.next_power_of_2(n_tokens))


@dataclass
class Launch:
    x: torch.Tensor  # [T, cols] (BN == 1) or packed [T_chunks, cols, BN]
    y: torch.Tensor  # output
    n_tokens: int
    chunks: int
    cfg: dict
    y_strides: tuple[int, int, int]  # (chunk, lane, row)
    store_tokens: int  # lanes c*BN + b < store_tokens are written (all lanes of a packed output)


def plan_launch(op: str, x: torch.Tensor, w: Any, bias: torch.Tensor | None, *, n_tokens: int | None,
                out_dtype: torch.dtype | None, packed_out: int, config: dict | None,
                out: torch.Tensor | None = None) -> Launch:
    """Check the arguments of a matmul wrapper (``w``: a ``nibble``/``delta`` matrix of ``dsf_runtime.formats``),
    pack ``x`` if needed and allocate the output."""
    if w.layout != op:
        raise ValueError(f"{op}_matmul needs a {op!r} matrix, got layout {w.layout!r}")
    rows, cols = w.shape
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the matrix is on {w.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if bias is not None and (bias.shape != (rows,) or bias.device != w.device):
        raise ValueError(f"bias must be [{rows}] on {w.device}, got {list(bias.shape)} on {bias.device}")
    out_dtype = out_dtype or x.dtype
    per_row = w.slots if op == "nibble" else w.slots // max(rows, 1)
    if x.dim() == 3:
        if n_tokens is None:
            raise ValueError("a packed x [T_chunks, cols, BN] needs n_tokens")
        chunks, xcols, bn = x.shape
        if xcols != cols or not x.is_contiguous():
            raise ValueError(f"packed x must be contiguous [T_chunks, {cols}, BN], got {list(x.shape)}")
        if not 0 <= n_tokens <= chunks * bn:
            raise ValueError(f"n_tokens={n_tokens} does not fit a packed x of {chunks} chunks of {bn}")
        cfg = dict(config or lookup(op, rows, per_row, bn), BN=bn)
        T = n_tokens
    elif x.dim() == 2:
        T = x.shape[0]
        if x.shape[1] != cols or x.stride(1) != 1:
            raise ValueError(f"x must be [T, {cols}] with unit column stride, got {list(x.shape)} strides {x.stride()}")
        cfg = dict(config or lookup(op, rows, per_row, token_block(T)))
        chunks = triton.cdiv(T, cfg["BN"])
    else:
        raise ValueError(f"x must be [T, cols] or packed [T_chunks, cols, BN], got {list(x.shape)}")
    bn = cfg["BN"]
    if packed_out and packed_out != bn:
        raise ValueError(f"packed_out={packed_out} must equal the kernel's BN={bn}")
    if x.dim() == 2 and bn > 1:
        x = pack_activations(x, bn, dtype=torch.float32 if cfg.get("XF32") else None)
    shape = (chunks, rows, bn) if packed_out else (T, rows)
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != out_dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {list(shape)} {out_dtype} tensor on {x.device}, got "
                             f"{list(out.shape)} {out.dtype} on {out.device}")
        y = out
    else:
        y = torch.empty(shape, dtype=out_dtype, device=x.device)
    strides = (rows * bn, 1, bn) if packed_out else (bn * rows, rows, 1)
    return Launch(x, y, T, chunks, cfg, strides, chunks * bn if packed_out else T)
