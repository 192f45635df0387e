"""What the runtime modules call: convert a factor once (``prepare_factor``), then run ``y = A·(B·x)``
(``factorized_matmul``) or ``y = W·x`` (``sparse_matmul``) with the path chosen by the token count.

Paths (``path=`` argument, default ``"auto"``):

- ``"decode"``: the streaming Triton kernels, fp32 intermediate ``B·x``. Two ``nibble`` factors run fused in
  one launch (``dsf_fused_matmul``, when ``configs.FUSED_DSF``); otherwise one launch per factor
  (``nibble_matmul`` / ``delta_matmul``) handing ``B·x`` over in the packed layout, plus one to pack the tokens
  when there are several. No host sync, no data-dependent allocation: CUDA-graph capturable.
  ``"decode_fused"`` / ``"decode_split"`` force either form (benchmarks).
- ``"prefill"``: decompress each factor to a dense temporary (Triton) and multiply with cuBLAS. The intermediate
  is rounded to the activation dtype (cuBLAS has no fp16×fp32 GEMM).
- ``"prefill_overlap"``: the same, decompressing on a side stream in row chunks that overlap the GEMMs of earlier
  chunks (measured slower on an H100: cuBLAS's GEMMs leave no SM room to overlap).
- ``"decode_bn1"``: the decode kernels with one token per program (weights re-read from L2 per token).
- ``"materialize"``: ``W = A·B`` (dense temporary), then one GEMM: fewer FLOPs once tokens > max(out, in).
- ``"torch"``: the plain-torch reference (float32), the fallback on CPU without the Triton interpreter.

``"auto"`` takes ``"decode"`` up to ``configs.DECODE_MAX_TOKENS`` tokens, ``"materialize"`` when its FLOP count
is lower, ``"prefill"`` otherwise; on CPU it takes the kernels only under ``TRITON_INTERPRET=1``.
Call ``warmup`` for the token counts you will capture before capturing: the first call of a new shape compiles.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from dsf_runtime.kernels import configs
from dsf_runtime.kernels._io import token_block
from dsf_runtime.kernels.delta_matmul import _delta_matmul_kernel, delta_matmul
from dsf_runtime.kernels.delta_unpack import delta_unpack
from dsf_runtime.kernels.dsf_fused_matmul import dsf_fused_matmul
from dsf_runtime.kernels.layouts import (
    KernelMatrix,
    _delta_plan,
    group_counts,
    nibble_bytes,
    pack_delta,
    pack_dense,
    pack_nibble,
    unpack,
)
from dsf_runtime.kernels.nibble_matmul import nibble_matmul
from dsf_runtime.kernels.nibble_unpack import nibble_unpack
from dsf_runtime.kernels.pack_activations import pack_activations

__all__ = ["choose_layout", "factorized_matmul", "prepare_factor", "sparse_matmul", "warmup", "kernels_available"]

log = logging.getLogger(__name__)
PATHS = ("auto", "decode", "decode_bn1", "decode_fused", "decode_split", "prefill", "prefill_overlap",
         "materialize", "torch")
_SIDE_STREAMS: dict[torch.device, Any] = {}


def kernels_available(device: torch.device) -> bool:
    """True on CUDA, and on CPU when the kernels were defined under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return device.type == "cpu" and isinstance(_delta_matmul_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------- preparation
def choose_layout(dense: torch.Tensor, group: int = 16) -> str:
    """The layout with the fewest bytes: ``nibble`` (preferred within 10%), ``delta``, or ``dense`` when neither
    saves at least 10% over the dense matrix."""
    rows, cols = dense.shape
    vb = dense.element_size()
    counts = group_counts(dense, group)
    n_max = max(int(counts.max()) if counts.numel() else 1, 1)
    b_nib = nibble_bytes(rows, cols, n_max, group, vb)
    padded = _delta_plan(dense)[4]
    b_delta = int(padded.sum()) * (vb + 0.5) + 4 * (rows + 1)
    b_dense = rows * cols * vb
    if min(b_nib, b_delta) > 0.9 * b_dense:
        return "dense"
    return "nibble" if b_nib <= 1.1 * b_delta else "delta"


def prepare_factor(factor: Any, *, layout: str = "auto", group: int = 16, per_group: int | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KernelMatrix:
    """Convert a factor once, at load time, to the layout the kernels read.

    Args:
        factor: a dense ``[rows, cols]`` tensor (zeros = pruned), any object with ``to_dense()`` (the packed
            formats of ``dsf_runtime.formats``: csr, bitmask, bsr, dense), or a ``KernelMatrix`` (moved/cast).
        layout: ``"auto"`` (``choose_layout``), ``"nibble"``, ``"delta"`` or ``"dense"``.
        group: ``G`` of the nibble layout.
        per_group: ``N`` of the nibble layout (default: the largest group count).
        dtype: value dtype (default: the factor's; use the activation dtype).
        device: target device (default: the factor's).

    Returns:
        The ``KernelMatrix``.
    """
    if isinstance(factor, KernelMatrix):
        dense = unpack(factor) if (dtype and dtype != factor.dtype) else None
        if dense is None:
            return factor.to(device) if device is not None else factor
        factor = dense
    if isinstance(factor, torch.Tensor):
        dense = factor
    elif hasattr(factor, "to_dense"):
        dense = factor.to_dense()
    else:
        raise TypeError(f"cannot prepare a factor of type {type(factor).__name__}; pass a dense tensor, a packed "
                        f"matrix of dsf_runtime.formats or a KernelMatrix")
    dense = dense.to(device=device or dense.device, dtype=dtype or dense.dtype)
    if layout == "auto":
        layout = choose_layout(dense, group)
    if layout == "nibble":
        return pack_nibble(dense, per_group, group)
    if layout == "delta":
        return pack_delta(dense)
    if layout == "dense":
        return pack_dense(dense)
    raise ValueError(f"unknown layout {layout!r}; expected 'auto', 'nibble', 'delta' or 'dense'")


# ---------------------------------------------------------------------------------------------- paths
def _check_x(x: torch.Tensor, cols: int, device: torch.device) -> None:
    if x.dim() < 1 or x.shape[-1] != cols:
        raise ValueError(f"x must be [..., {cols}], got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the factors are on {device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")


def _stream_mm(x: torch.Tensor, k: KernelMatrix, bias, *, n_tokens: int, out_dtype, packed_out: int, bn: int):
    op = nibble_matmul if k.layout == "nibble" else delta_matmul
    per_row = k.slots if k.layout == "nibble" else k.slots // max(k.shape[0], 1)
    cfg = configs.lookup(k.layout, k.shape[0], per_row, bn)
    return op(x, k, bias, n_tokens=n_tokens, out_dtype=out_dtype, packed_out=packed_out, config=cfg)


def _decode(x2: torch.Tensor, factors: list[KernelMatrix], bias, fused: bool | None = None,
            bn: int | None = None) -> torch.Tensor:
    """Stream ``x2`` through the factors (last first: ``[A, B]`` computes ``A·(B·x)``); two ``nibble`` factors
    and at most 16 tokens run as one fused launch if ``fused`` (default ``configs.FUSED_DSF``). ``bn``: tokens per
    program (default: 1 up to ``configs.DECODE_BN1_MAX_TOKENS`` tokens, else ``token_block``)."""
    T = x2.shape[0]
    if bn is None:
        bn = 1 if T <= configs.DECODE_BN1_MAX_TOKENS else token_block(T)
    fused = configs.FUSED_DSF if fused is None else fused
    if fused and len(factors) == 2 and T <= 16 and bn == token_block(T) and all(k.layout == "nibble" for k in factors):
        kA, kB = factors
        return dsf_fused_matmul(x2, kA, kB, bias, config_a=configs.lookup("nibble", kA.shape[0], kA.slots, bn),
                                config_b=configs.lookup("nibble", kB.shape[0], kB.slots, bn))
    first = factors[-1]
    per_row = first.slots if first.layout == "nibble" else first.slots // max(first.shape[0], 1)
    xf32 = bool(configs.lookup(first.layout, first.shape[0], per_row, bn).get("XF32"))
    h = x2 if bn == 1 else pack_activations(x2, bn, dtype=torch.float32 if xf32 else None)
    for i, k in enumerate(reversed(factors)):
        last = i == len(factors) - 1
        h = _stream_mm(h, k, bias if last else None, n_tokens=T,
                       out_dtype=x2.dtype if last else torch.float32, packed_out=0 if last else bn, bn=bn)
    return h


def _dense_of(k: KernelMatrix, dtype: torch.dtype, out: torch.Tensor | None = None, rows=(0, None)) -> torch.Tensor:
    """Dense rows ``rows`` of ``k`` (into ``out`` if given)."""
    r0, r1 = rows
    if k.layout == "dense":
        d = k.values[r0:r1]
        d = d if d.dtype == dtype else d.to(dtype)
        return d if out is None else out.copy_(d)
    if k.layout == "nibble":
        cfg = configs.unpack_config(k.shape[0], k.slots)
        return nibble_unpack(k, out, dtype=dtype, row_start=r0, row_stop=r1, **cfg)
    return delta_unpack(k, out, dtype=dtype, row_start=r0, row_stop=r1)


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def _row_chunks(k: KernelMatrix, chunks: int) -> list[tuple[int, int]]:
    rows = k.shape[0]
    if chunks <= 1 or rows * k.shape[1] * 2 < configs.PREFILL_CHUNK_MIN_BYTES:
        return [(0, rows)]
    step = -(-rows // chunks)
    step = -(-step // 64) * 64
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _prefill(x2: torch.Tensor, factors: list[KernelMatrix], bias, chunks: int | None = None) -> torch.Tensor:
    """Decompress each factor to dense temporaries and multiply with cuBLAS.

    On CUDA the decompression runs on a side stream in row chunks, so that chunk ``i + 1`` (and the next factor)
    decompresses while the GEMM of chunk ``i`` runs; each GEMM writes its columns of the output in place."""
    dtype = x2.dtype
    T = x2.shape[0]
    chunks = configs.PREFILL_CHUNKS if chunks is None else chunks
    if not x2.is_cuda:
        h = x2
        for i, k in enumerate(reversed(factors)):
            h = F.linear(h, _dense_of(k, dtype), bias if i == len(factors) - 1 else None)
        return h
    plan = []  # (factor, row chunks, dense buffers, output), in execution order (B first)
    for k in reversed(factors):
        bounds = _row_chunks(k, chunks)
        bufs = [torch.empty(r1 - r0, k.shape[1], dtype=dtype, device=x2.device) for r0, r1 in bounds]
        plan.append((k, bounds, bufs, torch.empty(T, k.shape[0], dtype=dtype, device=x2.device)))
    main = torch.cuda.current_stream(x2.device)
    side = _side_stream(x2.device)
    side.wait_stream(main)
    events = []
    with torch.cuda.stream(side):
        for k, bounds, bufs, _ in plan:
            for (r0, r1), buf in zip(bounds, bufs):
                _dense_of(k, dtype, buf, (r0, r1))
                ev = torch.cuda.Event()
                ev.record(side)
                events.append(ev)
    h, it = x2, iter(events)
    for i, (k, bounds, bufs, out) in enumerate(plan):
        last = i == len(plan) - 1
        for (r0, r1), buf in zip(bounds, bufs):
            main.wait_event(next(it))
            if last and bias is not None:
                torch.addmm(bias[r0:r1], h, buf.t(), out=out[:, r0:r1])
            else:
                torch.mm(h, buf.t(), out=out[:, r0:r1])
        h = out
    main.wait_stream(side)
    return h


def _materialize(x2: torch.Tensor, factors: list[KernelMatrix], bias) -> torch.Tensor:
    dtype = x2.dtype
    W = _dense_of(factors[0], dtype)
    for k in factors[1:]:
        W = W @ _dense_of(k, dtype)
    return F.linear(x2, W, bias)


def _torch_path(x2: torch.Tensor, factors: list[KernelMatrix], bias) -> torch.Tensor:
    h = x2.float()
    for k in reversed(factors):
        h = h @ unpack(k, torch.float32).t()
    if bias is not None:
        h = h + bias.float()
    return h.to(x2.dtype)


def _choose_path(tokens: int, factors: list[KernelMatrix]) -> str:
    m, n = factors[0].shape[0], factors[-1].shape[1]
    if any(k.layout == "dense" for k in factors):
        return "prefill"
    if tokens <= configs.decode_max_tokens(m, n, len(factors)):
        return "decode"
    if len(factors) == 2:
        r = factors[0].shape[1]
        chain = tokens * (m * r + r * n)
        if m * r * n + tokens * m * n < chain:
            return "materialize"
    return "prefill"


def _run(x: torch.Tensor, factors: list[KernelMatrix], bias: torch.Tensor | None, path: str) -> torch.Tensor:
    m, n = factors[0].shape[0], factors[-1].shape[1]
    dev = factors[0].device
    _check_x(x, n, dev)
    for k in factors:
        if k.dtype != x.dtype:
            raise TypeError(f"factor values are {k.dtype} but x is {x.dtype}; prepare_factor(..., dtype={x.dtype})")
    if bias is not None and (bias.shape != (m,) or bias.device != dev):
        raise ValueError(f"bias must be [{m}] on {dev}, got {list(bias.shape)} on {bias.device}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    if not kernels_available(dev) and path != "torch":
        path = "torch"
    if path == "auto":
        path = _choose_path(tokens, factors)
    if tokens == 0:
        y = x2.new_empty(0, m)
    elif path.startswith("decode") and all(k.layout != "dense" for k in factors):
        fused = {"decode": None, "decode_bn1": False, "decode_fused": True, "decode_split": False}[path]
        y = _decode(x2, factors, bias, fused, 1 if path == "decode_bn1" else None)
    elif path == "prefill" or path.startswith("decode"):
        y = _prefill(x2, factors, bias)
    elif path == "prefill_overlap":
        y = _prefill(x2, factors, bias, chunks=configs.PREFILL_OVERLAP_CHUNKS)
    elif path == "materialize":
        y = _materialize(x2, factors, bias)
    else:
        y = _torch_path(x2, factors, bias)
    return y.reshape(*lead, m)


# ---------------------------------------------------------------------------------------------- public ops
def factorized_matmul(x: torch.Tensor, kA: KernelMatrix, kB: KernelMatrix, bias: torch.Tensor | None = None,
                      *, path: str = "auto") -> torch.Tensor:
    """``y = A·(B·x) (+ bias)`` for a DSF layer, ``x`` [..., in] → ``y`` [..., out] in ``x.dtype``.

    Args:
        x: activations, float16/bfloat16 (or float32) matching the factors' value dtype.
        kA: ``A`` [out, r] from ``prepare_factor``; kB: ``B`` [r, in].
        bias: ``[out]`` or ``None``.
        path: see the module docstring.

    Raises:
        ValueError / TypeError: shapes that do not chain, wrong device or dtype.
    """
    if kA.shape[1] != kB.shape[0]:
        raise ValueError(f"factors do not chain: A is {list(kA.shape)}, B is {list(kB.shape)}")
    if kA.device != kB.device:
        raise ValueError(f"A is on {kA.device} but B is on {kB.device}")
    return _run(x, [kA, kB], bias, path)


def sparse_matmul(x: torch.Tensor, kW: KernelMatrix, bias: torch.Tensor | None = None, *,
                  path: str = "auto") -> torch.Tensor:
    """``y = W·x (+ bias)`` for one sparse matrix ``W`` [out, in]; as ``factorized_matmul``."""
    return _run(x, [kW], bias, path)


def warmup(kA: KernelMatrix, kB: KernelMatrix | None = None, *, tokens=(1, 2, 4, 8, 16), dtype=None) -> None:
    """Run every path once per token count (compiles the kernels) so that a later CUDA-graph capture of these
    shapes launches without compiling."""
    factors = [kA] if kB is None else [kA, kB]
    dtype = dtype or kA.dtype
    for t in tokens:
        x = torch.zeros(t, factors[-1].shape[1], dtype=dtype, device=kA.device)
        _run(x, factors, None, "auto")
