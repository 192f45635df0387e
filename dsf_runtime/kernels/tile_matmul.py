"""Tensor-core matmul over the ``tile`` layout: ``y[t, i] = Σ_k W[i, k] · x[t, k]`` (+ bias) for batches of tokens.

"Load as sparse, compute as dense" (Flash-LLM, SpInfer): each program owns one tile row (``TR`` output rows) and
``BN`` tokens, walks its share of the tile columns and, per tile, decodes the weight tile into registers and runs
``tl.dot`` against the ``[BN, TC]`` activation block. The decode is pure register work: a stored element's value is
at ``tile_ptr[t]`` plus the number of set bits before it in the tile, an exclusive prefix sum over the tile's bits
(``tl.cumsum`` along each tile row plus the row totals before it), then a masked gather from the tile's contiguous
(L1-resident) values. Accumulation is fp32. With ``SPLIT_K > 1`` the tile columns are split over more programs
(more parallelism when ``ceil(rows / TR) · ceil(T / BN)`` is small); their partial sums are added atomically into an
fp32 output, so split-K results may differ in the last bits from run to run (summation order).

Both operands of ``tl.dot`` are in the weight's dtype, so a DSF chain rounds the intermediate ``B·x`` to it (as the
cuBLAS prefill path does). The kernel is correct on any valid input (tests run it in the interpreter); its speed is
unmeasured (no GPU was lent when it was written), so ``dispatch`` runs it only for matrices stored as ``tile``,
which no loader or export produces by default.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from dsf_runtime.kernels import configs

__all__ = ["tile_matmul", "tile_matmul_reference"]


@triton.jit
def _tile_matmul_kernel(
    x_ptr,  # [T, cols] activations, row stride stride_xt, unit column stride
    vals_ptr,  # [nnz] stored values, tile by tile
    bitmap_ptr,  # [n_tiles, TR*TC/8] uint8 presence bits
    tile_ptr_ptr,  # [n_tiles + 1] int32 value offsets
    bias_ptr,  # [rows] (read only when HAS_BIAS)
    y_ptr,  # [T, rows], row stride stride_yt; fp32 and zeroed when SPLIT_K > 1
    rows, cols, T, n_tc, stride_xt, stride_yt,
    TR: tl.constexpr, TC: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,  # multiply in fp32 (the CPU interpreter's tl.dot mishandles bfloat16; never on a GPU)
):
    pid_r, pid_t, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = tl.arange(0, TR)
    c = tl.arange(0, TC)
    tok = pid_t * BN + tl.arange(0, BN)
    pos = r[:, None] * TC + c[None, :]  # position p of every element of a tile
    acc = tl.zeros([BN, TR], dtype=tl.float32)
    per_split = tl.cdiv(n_tc, SPLIT_K)
    j0 = pid_k * per_split
    j1 = tl.minimum(j0 + per_split, n_tc)
    for j in range(j0, j1):
        t = pid_r * n_tc + j
        byte = tl.load(bitmap_ptr + t.to(tl.int64) * (TR * TC // 8) + pos // 8)
        bit = ((byte >> (pos % 8).to(tl.uint8)) & 1).to(tl.int32)  # [TR, TC]
        row_total = tl.sum(bit, axis=1)
        before = tl.cumsum(row_total, axis=0) - row_total  # set bits in the tile rows above
        index = before[:, None] + tl.cumsum(bit, axis=1) - bit  # exclusive prefix count in p order
        base = tl.load(tile_ptr_ptr + t)
        w = tl.load(vals_ptr + base + index, mask=bit != 0, other=0.0)  # [TR, TC]
        col = j * TC + c
        xb = tl.load(x_ptr + tok.to(tl.int64)[:, None] * stride_xt + col[None, :],
                     mask=(tok < T)[:, None] & (col < cols)[None, :], other=0.0).to(w.dtype)  # [BN, TC]
        if DOT_F32:
            acc += tl.dot(xb.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xb, tl.trans(w), input_precision="ieee")
    out_row = pid_r * TR + r
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + out_row, mask=out_row < rows, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + tok.to(tl.int64)[:, None] * stride_yt + out_row[None, :]
    ok = (tok < T)[:, None] & (out_row < rows)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y_ptrs, acc, mask=ok)


def tile_matmul(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x · Wᵀ (+ bias)`` for a ``tile`` matrix ``W`` [rows, cols] (``dsf_runtime.formats.TileMatrix``).

    Args:
        x: ``[T, cols]`` float16/bfloat16/float32 with unit column stride, on ``w``'s device; rounded to ``w``'s
            dtype for the tensor-core product.
        w: the matrix, layout ``tile``.
        bias: ``[rows]`` or None.
        out_dtype: dtype of ``y`` (default ``x.dtype``).
        config: ``{"BN", "SPLIT_K", "num_warps", "num_stages"}``, any of them (the rest from
            ``configs.tile_config``: the tuning file, else ``configs.tile_heuristic``); ``BN`` is 16, 32 or 64.
        out: optional contiguous ``[T, rows]`` ``out_dtype`` result tensor (every element is written).

    Returns:
        ``[T, rows]`` in ``out_dtype`` (``out`` when given).

    Raises:
        ValueError / TypeError: wrong layout, device, dtype or shape.
    """
    if w.layout != "tile":
        raise ValueError(f"tile_matmul needs a 'tile' matrix, got layout {w.layout!r}")
    rows, cols = w.shape
    if x.dim() != 2 or x.shape[1] != cols or x.stride(1) != 1:
        raise ValueError(f"x must be [T, {cols}] with unit column stride, got {list(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the matrix is on {w.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if bias is not None and (tuple(bias.shape) != (rows,) or bias.device != w.device):
        raise ValueError(f"bias must be [{rows}] on {w.device}, got {list(bias.shape)} on {bias.device}")
    cfg = {**configs.tile_config(rows, cols, w.grid, x.shape[0]), **(config or {})}
    if type(cfg["BN"]) is not int or cfg["BN"] not in (16, 32, 64) or type(cfg["SPLIT_K"]) is not int \
            or cfg["SPLIT_K"] < 1:
        raise ValueError(f"config needs an int BN in (16, 32, 64) and an int SPLIT_K >= 1, got {cfg}")
    if not (w.values.is_contiguous() and w.bitmap.is_contiguous() and w.tile_ptr.is_contiguous()):
        raise ValueError("the tile matrix's tensors must be contiguous")
    out_dtype = out_dtype or x.dtype
    T = x.shape[0]
    n_tr, n_tc = w.grid
    split = min(cfg["SPLIT_K"], max(n_tc, 1))
    if out is not None and (tuple(out.shape) != (T, rows) or out.dtype != out_dtype or out.device != x.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{T}, {rows}] {out_dtype} tensor on {x.device}")
    if split > 1:
        y = torch.zeros(T, rows, dtype=torch.float32, device=x.device)
    else:
        y = out if out is not None else torch.empty(T, rows, dtype=out_dtype, device=x.device)
    if T == 0 or rows == 0 or w.nnz == 0:  # nothing to multiply (and no values buffer to point the kernel at)
        y.zero_()
        if bias is not None and T:
            y += bias.to(y.dtype)
        return y.to(out_dtype) if out is None else out.copy_(y)
    grid = (n_tr, triton.cdiv(T, cfg["BN"]), split)
    _tile_matmul_kernel[grid](
        x, w.values, w.bitmap, w.tile_ptr, bias if bias is not None else y, y,
        rows, cols, T, n_tc, x.stride(0), y.stride(0),
        TR=w.tile_rows, TC=w.tile_cols, BN=cfg["BN"], SPLIT_K=split, HAS_BIAS=bias is not None,
        DOT_F32=w.dtype == torch.bfloat16 and x.device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if y is out:
        return out
    return out.copy_(y) if out is not None else y.to(out_dtype)


def tile_matmul_reference(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None,
                          *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Plain-torch ``x · Wᵀ + bias`` computed in ``dtype`` (float64 for tests)."""
    y = x.to(dtype) @ w.to_dense(dtype).t()
    return y if bias is None else y + bias.to(dtype)
