"""Decode matmul over the ``nibble`` layout: ``y[t, i] = Σ_s values[i, s] · x[t, col(i, s)]`` (+ bias).

Memory-bound at small batch: every program streams ``BLOCK_R`` rows of values (2 B/slot; 1 B/slot for int8 or
float8 codes; 0.5 B/slot for int4 codes, packed like the index) and 4-bit in-group columns (0.5 B/slot) as wide
contiguous vectors, gathers the activations by column from L1/L2 and accumulates in fp32. One-byte codes are
converted in registers and each row's sum is multiplied by its scale once, before the bias; int4 codes are
sign-extended in registers and each is multiplied by its column group's scale, gathered from L1 like the
activations. Activations come in one of two forms (``activation_layout`` below):

- ``BN == 1``: ``x`` is ``[T, cols]`` (any row stride); program column ``c`` handles token ``c``.
- ``BN > 1``: ``x`` is packed ``[T_chunks, cols, BN]`` (``pack_activations``): the ``BN`` tokens of a column are
  contiguous, so one vector load gathers them all.

The output element (token chunk ``c``, lane ``b``, row ``i``) goes to ``y + c·sy_c + b·sy_b + i·sy_i``: either the
normal ``[T, rows]`` layout or the packed ``[T_chunks, rows, BN]`` fp32 layout that the next DSF factor reads.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from dsf_runtime.kernels._io import plan_launch
from dsf_runtime.kernels.configs import pdl_options

__all__ = ["nibble_matmul", "nibble_matmul_reference"]


@triton.jit
def _load(ptrs, ok, other, MASKED: tl.constexpr, CG: tl.constexpr):
    """``tl.load`` of ``ptrs`` (masked by ``ok`` when MASKED; past L1 when CG)."""
    if CG:
        if MASKED:
            v = tl.load(ptrs, mask=ok, other=other, cache_modifier=".cg")
        else:
            v = tl.load(ptrs, cache_modifier=".cg")
    else:
        if MASKED:
            v = tl.load(ptrs, mask=ok, other=other)
        else:
            v = tl.load(ptrs)
    return v


@triton.jit
def _load_step(
    v_row,  # [1, BLOCK_R] pointers to the rows' values
    n_row,  # [1, BLOCK_R] pointers to the rows' index bytes
    s0,  # first slot of the step
    t,  # [HALF] byte offsets inside the step
    lo_local,  # [HALF] slot of each byte's low nibble inside the step
    S,  # slots per row
    MASKED: tl.constexpr,  # mask slots >= S
    CG: tl.constexpr,  # stream the weights past L1 (".cg"), keeping L1 for the gathered activations
    INT4: tl.constexpr,  # values are int4 codes packed like the index (split halves): one byte holds both slots
):
    slot_lo = s0 + lo_local
    ok = (slot_lo < S)[:, None]
    byte = _load(n_row + (s0 // 2 + t)[:, None], ok, 0, MASKED, CG)
    if INT4:
        packed = _load(v_row + (s0 // 2 + t)[:, None], ok, 0, MASKED, CG).to(tl.int32)
        v_lo = ((packed & 15) ^ 8) - 8  # sign-extend the 4-bit two's complement codes
        v_hi = ((packed >> 4) ^ 8) - 8
    else:
        v_lo = _load(v_row + slot_lo[:, None], ok, 0.0, MASKED, CG)
        v_hi = _load(v_row + (slot_lo + 16)[:, None], ok, 0.0, MASKED, CG)
    return byte, v_lo, v_hi


@triton.jit
def _nibble_rows(
    pid_c, pid_r,  # token chunk and row block of this program
    x_ptr, vals_ptr, nib_ptr, bias_ptr, scale_ptr, y_ptr,  # as _nibble_matmul_kernel
    rows, cols, S, S2, SV, n_sg, n_tokens, stride_xc, stride_yc, stride_yb, stride_yi,  # as _nibble_matmul_kernel
    G: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    EVEN_S: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, INT4: tl.constexpr, GS: tl.constexpr,
    PREFETCH: tl.constexpr, CG: tl.constexpr,
    GDC: tl.constexpr = False,  # programmatic dependent launch: wait for the previous grid only before reading x
):
    # Tiles are [slots, rows] (slots on axis 0): the value/index loads are contiguous along axis 0, and the
    # x gathers (no contiguity) then get the same register layout, so no layout conversion is needed (BN == 1).
    # BN > 1 accumulates elementwise in a [slots, rows, BN] tile and reduces once at the end.
    HALF: tl.constexpr = BLOCK_S // 2
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t = tl.arange(0, HALF)
    lo_local = (t // 16) * 32 + (t % 16)  # slot of the low nibble of byte t inside one loop step
    v_row = vals_ptr + r.to(tl.int64)[None, :] * SV
    n_row = nib_ptr + r.to(tl.int64)[None, :] * S2
    s_row = scale_ptr + r.to(tl.int64)[None, :] * n_sg  # int4: the rows' group scales
    live = (r < rows)[None, :]
    x_base = x_ptr + pid_c.to(tl.int64) * stride_xc
    if BN == 1:
        acc = tl.zeros([HALF, BLOCK_R], dtype=tl.float32)
    else:
        acc = tl.zeros([HALF, BLOCK_R, BN], dtype=tl.float32)
    if PREFETCH:
        byte, v_lo, v_hi = _load_step(v_row, n_row, 0, t, lo_local, S, not EVEN_S, CG, INT4)
    if GDC:
        gdc_wait()  # x (written by the previous kernel) is visible from here on; the weights never change
    for s0 in range(0, S, BLOCK_S):
        if PREFETCH:
            nxt_byte, nxt_lo, nxt_hi = _load_step(v_row, n_row, s0 + BLOCK_S, t, lo_local, S, True, CG, INT4)
        else:
            byte, v_lo, v_hi = _load_step(v_row, n_row, s0, t, lo_local, S, not EVEN_S, CG, INT4)
        slot_lo = s0 + lo_local
        c_lo = tl.minimum(((slot_lo // N) * G)[:, None] + (byte & 15).to(tl.int32), cols - 1)
        c_hi = tl.minimum((((slot_lo + 16) // N) * G)[:, None] + (byte >> 4).to(tl.int32), cols - 1)
        w_lo = v_lo.to(tl.float32)
        w_hi = v_hi.to(tl.float32)
        if INT4:  # each code times its column's group scale (L1-resident: rows x ceil(cols / GS) scales)
            w_lo = w_lo * tl.load(s_row + c_lo // GS, mask=live, other=0.0).to(tl.float32)
            w_hi = w_hi * tl.load(s_row + c_hi // GS, mask=live, other=0.0).to(tl.float32)
        if BN == 1:
            x_lo = tl.load(x_base + c_lo).to(tl.float32)
            x_hi = tl.load(x_base + c_hi).to(tl.float32)
            acc += w_lo * x_lo + w_hi * x_hi
        else:
            lane = tl.arange(0, BN)[None, None, :]
            x_lo = tl.load(x_base + c_lo[:, :, None] * BN + lane).to(tl.float32)
            x_hi = tl.load(x_base + c_hi[:, :, None] * BN + lane).to(tl.float32)
            acc += w_lo[:, :, None] * x_lo + w_hi[:, :, None] * x_hi
        if PREFETCH:
            byte, v_lo, v_hi = nxt_byte, nxt_lo, nxt_hi
    if GDC:
        gdc_launch_dependents()  # the next kernel may start its weight prefetch on freed SMs
    if BN == 1:
        out = tl.sum(acc, axis=0)[:, None]  # [BLOCK_R, 1]
    else:
        out = tl.sum(acc, axis=0)  # [BLOCK_R, BN]
    if HAS_SCALE:
        out *= tl.load(scale_ptr + r, mask=r < rows, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + r, mask=r < rows, other=0.0).to(tl.float32)[:, None]
    lane = tl.arange(0, BN)[None, :]
    ok = (r < rows)[:, None] & (pid_c * BN + lane < n_tokens)
    y_ptrs = y_ptr + pid_c.to(tl.int64) * stride_yc + lane * stride_yb + r[:, None] * stride_yi
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nibble_matmul_kernel(
    x_ptr,  # activations: element (chunk c, column k, lane b) at x_ptr + c*stride_xc + k*BN + b
    vals_ptr,  # [rows_pad, SV] stored values (fp16/bf16/fp32, int8 or float8 codes; int4 codes: uint8, SV = S2)
    nib_ptr,  # [rows_pad, S2] uint8 in-group columns, split halves per 32-slot chunk
    bias_ptr,  # [rows] bias (read only when HAS_BIAS)
    scale_ptr,  # [rows] row scales of one-byte codes (HAS_SCALE), or [rows, n_sg] group scales of int4 codes
    y_ptr,  # output: element (chunk c, lane b, row i) at y_ptr + c*stride_yc + b*stride_yb + i*stride_yi
    rows,  # logical rows (outputs); rows >= rows are computed from zero padding and not stored
    cols,  # logical columns (inputs); gathers are clamped to cols - 1 (zero-valued pad slots)
    S,  # slots per row, a multiple of 32
    S2,  # S // 2: index bytes per row
    SV,  # stored value elements per row: S, or S2 for int4 codes
    n_sg,  # int4: scales per row, ceil(cols / GS)
    n_tokens,  # lanes with c*BN + b >= n_tokens are not stored (T, or all lanes of a packed output)
    stride_xc,  # elements between token chunks of x
    stride_yc,  # elements between token chunks of y
    stride_yb,  # elements between lanes (tokens inside a chunk) of y
    stride_yi,  # elements between rows of y
    G: tl.constexpr,  # group width (columns per group, <= 16)
    N: tl.constexpr,  # slots per group
    BN: tl.constexpr,  # tokens per program (1 = plain rows of x; > 1 = packed x)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_S: tl.constexpr,  # slots per loop step, a multiple of 32
    EVEN_S: tl.constexpr,  # S % BLOCK_S == 0: no slot mask
    HAS_BIAS: tl.constexpr,  # add bias_ptr[i] to every output of row i
    HAS_SCALE: tl.constexpr,  # multiply row i's sum by scale_ptr[i] (one-byte codes)
    INT4: tl.constexpr,  # int4 codes: each value times scale_ptr[i, col // GS]
    GS: tl.constexpr,  # int4: columns per scale
    PREFETCH: tl.constexpr,  # load the next step's weights before using the current ones (register double buffer)
    CG: tl.constexpr,  # weights bypass L1 (cache_modifier ".cg")
    GDC: tl.constexpr,  # launched with programmatic dependent launch (griddepcontrol wait / launch_dependents)
):
    _nibble_rows(tl.program_id(0), tl.program_id(1), x_ptr, vals_ptr, nib_ptr, bias_ptr, scale_ptr, y_ptr,
                 rows, cols, S, S2, SV, n_sg, n_tokens, stride_xc, stride_yc, stride_yb, stride_yi,
                 G, N, BN, BLOCK_R, BLOCK_S, EVEN_S, HAS_BIAS, HAS_SCALE, INT4, GS, PREFETCH, CG, GDC)

def nibble_matmul(
    x: torch.Tensor,
    w: Any,
    bias: torch.Tensor | None = None,
    *,
    n_tokens: int | None = None,
    out_dtype: torch.dtype | None = None,
    packed_out: int = 0,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x · Wᵀ (+ bias)`` for a ``nibble`` matrix ``W`` [rows, cols]: float values; one-byte codes (int8,
    float8_e4m3fn) with row scales, ``y = scale · (x · codesᵀ) (+ bias)``; or int4 codes, each multiplied by its
    column group's scale in registers.

    Args:
        x: ``[T, cols]`` (processed with ``BN = 1`` unless ``config`` says otherwise, then packed here) or an
            already packed ``[T_chunks, cols, BN]`` tensor (``pack_activations``); then ``n_tokens`` is required.
            float16/bfloat16/float32, on ``w``'s device.
        w: the matrix, layout ``nibble``.
        bias: ``[rows]`` or ``None``.
        n_tokens: number of real tokens of a packed ``x``.
        out_dtype: output dtype (default ``x.dtype``).
        packed_out: if > 0, return the packed ``[T_chunks, rows, BN]`` layout (``BN`` = ``packed_out``, must equal
            the kernel's ``BN``) instead of ``[T, rows]``; the chained DSF factor reads it directly.
        config: ``{"BN", "BLOCK_R", "BLOCK_S", "num_warps", "num_stages"}`` and optionally ``"PREFETCH"``
            (register double buffering of the weights), ``"CG"`` (weights bypass L1), ``"XF32"`` (pack x as
            float32) (default: ``configs.lookup``).
        out: optional preallocated contiguous output of the result's shape and dtype.

    Returns:
        ``[T, rows]`` (or packed, see ``packed_out``) in ``out_dtype``.

    Raises:
        ValueError / TypeError: wrong layout, device, dtype, shape or strides.
    """
    L = plan_launch("nibble", x, w, bias, n_tokens=n_tokens, out_dtype=out_dtype, packed_out=packed_out,
                    config=config, out=out)
    rows, cols = w.shape
    S = w.slots
    cfg = L.cfg
    if L.chunks == 0 or rows == 0:
        return L.y.zero_()
    grid = (L.chunks, triton.cdiv(rows, cfg["BLOCK_R"]))
    scales, int4 = w.scales, w.group_size is not None
    _nibble_matmul_kernel[grid](
        L.x, w.values, w.index, bias if bias is not None else L.y, scales if scales is not None else L.y, L.y,
        rows, cols, S, S // 2, w.values.shape[1], scales.shape[1] if int4 else 1, L.store_tokens, L.x.stride(0),
        *L.y_strides, G=w.group, N=w.per_group, BN=cfg["BN"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
        EVEN_S=S % cfg["BLOCK_S"] == 0, HAS_BIAS=bias is not None, HAS_SCALE=scales is not None and not int4,
        INT4=int4, GS=w.group_size or 1,
        PREFETCH=bool(cfg.get("PREFETCH", False)), CG=bool(cfg.get("CG", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_options(L.x),
    )
    return L.y


def nibble_matmul_reference(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None,
                            *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Plain-torch ``x · Wᵀ + bias`` computed in ``dtype`` (float64 for tests, float32 as a fallback)."""
    y = x.to(dtype) @ w.to_dense(dtype).t()
    return y if bias is None else y + bias.to(dtype)
