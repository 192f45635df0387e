"""Fused DSF decode: ``y = A·(B·x) (+ bias)`` for ``nibble`` factors in ONE launch (up to 16 tokens).

Programs ``0 .. nB-1`` compute row blocks of ``z = B·x`` (fp32, packed ``[r, BN]``) and then count themselves done
on an int32 counter (release). Programs ``nB ..`` handle row blocks of ``A``: they put their first weight step in
flight, spin on the counter (acquire) until all of ``z`` is written, then stream the rest of ``A``. The last
``A`` program resets the counters, so the next launch (or CUDA-graph replay) starts from zero.

This saves the second launch and its ramp-up/tail gap. It relies on the GPU dispatching programs in increasing
id order (the ``B`` programs, which never wait, are all resident before any ``A`` program can occupy a slot),
the assumption CUTLASS's semaphores and stream-K make. Under ``TRITON_INTERPRET=1`` programs run in id order.
Two fused DSF calls must not run concurrently on one device (they share the counters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsf_runtime.kernels._io import token_block
from dsf_runtime.kernels.layouts import KernelMatrix, unpack
from dsf_runtime.kernels.nibble_matmul import _nibble_rows

__all__ = ["dsf_fused_matmul", "dsf_fused_matmul_reference"]

_COUNTERS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _dsf_fused_matmul_kernel(
    x_ptr,  # activations: [T, n] (BN == 1) or packed [1, n, BN]
    z_ptr,  # [r, BN] fp32 workspace for B·x
    y_ptr,  # [T, m] output
    bias_ptr,  # [m] bias (read only when HAS_BIAS)
    cnt_ptr,  # int32[2]: B programs done, A programs done (zero between launches)
    b_vals, b_nib,  # factor B [r, n]: values [r_pad, S_B], index bytes [r_pad, S_B // 2]
    b_rows, b_cols, b_S, b_S2,  # r, n, S_B, S_B // 2
    a_vals, a_nib,  # factor A [m, r]
    a_rows, a_cols, a_S, a_S2,  # m, r, S_A, S_A // 2
    n_tokens,  # T (<= BN)
    BN: tl.constexpr,  # token lanes
    HAS_BIAS: tl.constexpr,  # add bias to y
    G_B: tl.constexpr, N_B: tl.constexpr, BR_B: tl.constexpr, BS_B: tl.constexpr,  # B's group, slots, tiles
    EVEN_B: tl.constexpr, PF_B: tl.constexpr, CG_B: tl.constexpr,  # B's step mask, prefetch, L1 bypass
    G_A: tl.constexpr, N_A: tl.constexpr, BR_A: tl.constexpr, BS_A: tl.constexpr,  # A's group, slots, tiles
    EVEN_A: tl.constexpr, PF_A: tl.constexpr, CG_A: tl.constexpr,  # A's step mask, prefetch, L1 bypass
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)  # always 0: one token chunk
    n_b = tl.cdiv(b_rows, BR_B)
    n_a = tl.cdiv(a_rows, BR_A)
    if pid < n_b:
        _nibble_rows(chunk, pid, x_ptr, b_vals, b_nib, bias_ptr, z_ptr,
                     b_rows, b_cols, b_S, b_S2, BN, 0, 0, 1, BN, cnt_ptr, 0,
                     G_B, N_B, BN, BR_B, BS_B, EVEN_B, False, PF_B, CG_B, False)
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    else:
        _nibble_rows(chunk, pid - n_b, z_ptr, a_vals, a_nib, bias_ptr, y_ptr,
                     a_rows, a_cols, a_S, a_S2, n_tokens, 0, 0, a_rows, 1, cnt_ptr, n_b,
                     G_A, N_A, BN, BR_A, BS_A, EVEN_A, HAS_BIAS, PF_A, CG_A, True)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done == n_a - 1:
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(cnt_ptr + 1, 0, sem="relaxed", scope="gpu")


def _counters(device: torch.device) -> torch.Tensor:
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def dsf_fused_matmul(x: torch.Tensor, kA: KernelMatrix, kB: KernelMatrix, bias: torch.Tensor | None = None, *,
                     config_a: dict | None = None, config_b: dict | None = None) -> torch.Tensor:
    """``y = A·(B·x) (+ bias)``, one launch; ``x`` [T, in] with ``T <= 16``.

    Args:
        x: float16/bfloat16/float32 activations on the factors' device, unit column stride.
        kA, kB: ``nibble`` factors ``A`` [out, r] and ``B`` [r, in] with the values' dtype of ``x``.
        bias: ``[out]`` or ``None``.
        config_a, config_b: per-factor tiles as ``nibble_matmul``'s ``config`` (``num_warps`` from ``config_b``).

    Returns:
        ``[T, out]`` in ``x.dtype``.
    """
    from dsf_runtime.kernels.configs import lookup
    from dsf_runtime.kernels.pack_activations import pack_activations

    for name, k in (("A", kA), ("B", kB)):
        if k.layout != "nibble":
            raise ValueError(f"dsf_fused_matmul needs 'nibble' factors, {name} is {k.layout!r}")
    if kA.shape[1] != kB.shape[0] or kA.device != kB.device:
        raise ValueError(f"factors do not chain: A {list(kA.shape)} on {kA.device}, B {list(kB.shape)} on {kB.device}")
    m, r = kA.shape
    n = kB.shape[1]
    if x.dim() != 2 or x.shape[1] != n or x.stride(1) != 1 or x.device != kA.device:
        raise ValueError(f"x must be [T, {n}] with unit column stride on {kA.device}, got {list(x.shape)}")
    T = x.shape[0]
    if not 1 <= T <= 16:
        raise ValueError(f"dsf_fused_matmul handles 1..16 tokens, got {T}")
    if bias is not None and (bias.shape != (m,) or bias.device != kA.device):
        raise ValueError(f"bias must be [{m}] on {kA.device}, got {list(bias.shape)}")
    bn = token_block(T)
    cb = dict(config_b or lookup("nibble", r, kB.slots, bn))
    ca = dict(config_a or lookup("nibble", m, kA.slots, bn))
    xin = x if bn == 1 else pack_activations(x, bn, dtype=torch.float32 if cb.get("XF32") else None)
    z = torch.empty(r, bn, dtype=torch.float32, device=x.device)
    y = torch.empty(T, m, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(r, cb["BLOCK_R"]) + triton.cdiv(m, ca["BLOCK_R"]), 1)
    SB, SA = kB.values.shape[1], kA.values.shape[1]
    _dsf_fused_matmul_kernel[grid](
        xin, z, y, bias if bias is not None else y, _counters(x.device),
        kB.values, kB.index, r, n, SB, SB // 2,
        kA.values, kA.index, m, r, SA, SA // 2,
        T, BN=bn, HAS_BIAS=bias is not None,
        G_B=kB.group, N_B=kB.per_group, BR_B=cb["BLOCK_R"], BS_B=cb["BLOCK_S"], EVEN_B=SB % cb["BLOCK_S"] == 0,
        PF_B=bool(cb.get("PREFETCH")), CG_B=bool(cb.get("CG")),
        G_A=kA.group, N_A=kA.per_group, BR_A=ca["BLOCK_R"], BS_A=ca["BLOCK_S"], EVEN_A=SA % ca["BLOCK_S"] == 0,
        PF_A=bool(ca.get("PREFETCH")), CG_A=bool(ca.get("CG")),
        num_warps=cb["num_warps"], num_stages=cb["num_stages"],
    )
    return y


def dsf_fused_matmul_reference(x: torch.Tensor, kA: KernelMatrix, kB: KernelMatrix,
                               bias: torch.Tensor | None = None, *, dtype=torch.float64) -> torch.Tensor:
    """Plain-torch ``A·(B·x) + bias`` in ``dtype``."""
    y = (x.to(dtype) @ unpack(kB, dtype).t()) @ unpack(kA, dtype).t()
    return y if bias is None else y + bias.to(dtype)
