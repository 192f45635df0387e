"""Kernel layouts: how a sparse factor sits in GPU memory for the Triton kernels of this package.

Two sparse layouts plus a dense one, all built once at load time (``dsf_runtime.kernels.prepare_factor``):

``nibble`` (balanced groups; 2.5 B per stored slot)
    Every row is cut into groups of ``G`` (``group``, 1..16) consecutive columns; each group stores exactly ``N``
    (``per_group``) slots, so every row has the same length ``S`` and needs no row pointer. A slot is a value
    plus its 4-bit column inside the group; a group with fewer than ``N`` non-zeros stores zero-valued slots.

    - ``values``: ``[rows_pad, S]`` float16/bfloat16/float32; slot ``s`` of row ``i`` belongs to group ``s // N``.
      ``rows_pad`` is ``rows`` rounded up to ``ROW_PAD``; ``S = ceil(ngroups·N / 32)·32`` (``ngroups =
      ceil(cols / G)``); pad rows and pad slots hold zeros.
    - ``index``: ``[rows_pad, S // 2]`` uint8, "split halves" per chunk of 32 slots: byte ``j`` (0..15) of
      chunk ``c`` holds slot ``32c + j`` in its low nibble and slot ``32c + 16 + j`` in its high nibble, so a
      kernel unpacks runs of 16 consecutive slots from each half of a byte vector without interleaving.
      Column of slot ``s`` = ``(s // N)·G + nibble(s)``; zero-valued slots may point anywhere (also past ``cols``).

``delta`` (unstructured, faithful; MACKO-style 4-bit column deltas)
    Row ``i`` is a list of entries ``(value, d)`` with ``d`` in 0..15; the column of entry ``k`` is
    ``col[k-1] + d + 1`` (``col[-1] = -1``). A gap of more than 15 zeros is bridged by zero-valued filler entries
    with ``d = 15``; each row is padded with zero entries to a multiple of ``DELTA_CHUNK`` (32) entries.

    - ``values``: ``[total]``; ``index``: ``[total // 2]`` uint8, split halves per chunk of 32 entries (byte ``j``
      (0..15) of chunk ``c`` holds entry ``32c + j`` low and ``32c + 16 + j`` high); ``row_ptr``: ``[rows + 1]``
      int32 entry offsets (multiples of 32).

``dense``
    ``values``: ``[rows, cols]``; the cuBLAS path, for matrices too dense to gain from sparsity.

Everything here is pure torch and runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "DELTA_CHUNK",
    "NIBBLE_CHUNK",
    "ROW_PAD",
    "KernelMatrix",
    "balance_mask",
    "group_counts",
    "is_balanced",
    "nibble_bytes",
    "pack_delta",
    "pack_dense",
    "pack_nibble",
    "unpack",
]

NIBBLE_CHUNK = 32  # slots per split-halves chunk of the nibble layout
DELTA_CHUNK = 32  # entries per split-halves chunk of the delta layout
ROW_PAD = 16  # nibble rows are padded to a multiple of this (kernels read whole row blocks unmasked)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, eq=False)
class KernelMatrix:
    """A factor converted for the kernels (see the module docstring for each layout's tensors).

    Attributes:
        layout: ``"nibble"``, ``"delta"`` or ``"dense"``.
        shape: ``(rows, cols)`` of the logical matrix.
        values: stored values (layout-specific shape), float16/bfloat16/float32.
        index: uint8 packed 4-bit indices (``nibble``, ``delta``), else ``None``.
        row_ptr: int32 ``[rows + 1]`` entry offsets (``delta``), else ``None``.
        group: ``G`` (``nibble``), else 0.
        per_group: ``N`` (``nibble``), else 0.
        nnz: non-zeros of the logical matrix (not counting zero-valued padding slots).
    """

    layout: str
    shape: tuple[int, int]
    values: torch.Tensor
    index: torch.Tensor | None = None
    row_ptr: torch.Tensor | None = None
    group: int = 0
    per_group: int = 0
    nnz: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def slots(self) -> int:
        """Stored entries per row (``nibble``: ``S``) or in total (``delta``), padding included."""
        return self.values.shape[-1] if self.layout == "nibble" else self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes a kernel streams to read the whole matrix (all stored tensors)."""
        parts = (self.values, self.index, self.row_ptr)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[rows, cols]`` matrix (pure torch)."""
        return unpack(self, dtype)

    def to(self, device: torch.device | str) -> KernelMatrix:
        """A copy on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return KernelMatrix(self.layout, self.shape, move(self.values), move(self.index), move(self.row_ptr),
                            self.group, self.per_group, self.nnz)


def _check_matrix(w: torch.Tensor, name: str = "matrix") -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"{name} must be a 2-D tensor [rows, cols], got {type(w).__name__} "
                        f"{list(getattr(w, 'shape', []))}")
    if w.dtype not in VALUE_DTYPES:
        raise TypeError(f"{name} has dtype {w.dtype}; expected float16, bfloat16 or float32")


def _check_group(group: int, per_group: int | None = None) -> None:
    if not 1 <= group <= 16:
        raise ValueError(f"group must be in 1..16 (4-bit in-group index), got {group}")
    if per_group is not None and not 1 <= per_group <= group:
        raise ValueError(f"per_group must be in 1..group={group}, got {per_group}")


def group_counts(mask: torch.Tensor, group: int = 16) -> torch.Tensor:
    """Non-zeros per group of ``group`` consecutive columns: ``[rows, ceil(cols / group)]`` int32."""
    rows, cols = mask.shape
    ngroups = -(-cols // group)
    m = torch.zeros(rows, ngroups * group, dtype=torch.int32, device=mask.device)
    m[:, :cols] = (mask != 0).to(torch.int32)
    return m.view(rows, ngroups, group).sum(-1, dtype=torch.int32)


def is_balanced(w: torch.Tensor, group: int = 16, per_group: int = 8) -> bool:
    """True iff no group of ``group`` consecutive columns of any row holds more than ``per_group`` non-zeros."""
    return bool((group_counts(w, group) <= per_group).all())


def balance_mask(scores: torch.Tensor, per_group: int, group: int = 16) -> torch.Tensor:
    """Top-``per_group`` mask per group of ``group`` consecutive columns of every row.

    This is the projection a DSF solver uses instead of a global magnitude threshold to produce factors the
    ``nibble`` layout stores exactly (ties broken by lower column). A last partial group keeps
    ``min(per_group, its width)`` entries.

    Args:
        scores: ``[rows, cols]`` saliency (e.g. ``|X + U|``), any float dtype and device.
        per_group: ``N``, kept entries per group.
        group: ``G``, group width (1..16).

    Returns:
        bool ``[rows, cols]``.
    """
    _check_group(group, per_group)
    rows, cols = scores.shape
    ngroups = -(-cols // group)
    s = torch.full((rows, ngroups * group), float("-inf"), dtype=torch.float32, device=scores.device)
    s[:, :cols] = scores.float().abs()
    top = s.view(rows, ngroups, group).topk(per_group, dim=-1, sorted=False).indices
    mask = torch.zeros(rows, ngroups, group, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, top, True)
    return mask.view(rows, ngroups * group)[:, :cols].contiguous()


def pack_nibble(w: torch.Tensor, per_group: int | None = None, group: int = 16, *,
                dtype: torch.dtype | None = None) -> KernelMatrix:
    """Pack a dense matrix whose groups hold at most ``per_group`` non-zeros into the ``nibble`` layout.

    Args:
        w: ``[rows, cols]`` float16/bfloat16/float32; zeros are pruned entries.
        per_group: ``N``; default: the largest group count of ``w`` (at least 1).
        group: ``G`` (1..16).
        dtype: value dtype (default ``w.dtype``).

    Raises:
        ValueError: a group holds more than ``per_group`` non-zeros (use ``balance_mask`` first, or the
            ``delta`` layout for unstructured matrices).
    """
    _check_matrix(w, "w")
    _check_group(group)
    w = w.to(dtype or w.dtype)
    rows, cols = w.shape
    counts = group_counts(w, group)
    top = int(counts.max()) if counts.numel() else 0
    n = max(top, 1) if per_group is None else per_group
    _check_group(group, n)
    if top > n:
        bad = (counts > n).nonzero()[0].tolist()
        raise ValueError(f"row {bad[0]} group {bad[1]} (columns {bad[1] * group}..{bad[1] * group + group - 1}) holds "
                         f"{int(counts[bad[0], bad[1]])} non-zeros > per_group={n}; balance the mask with "
                         f"balance_mask(...) or pack the matrix with pack_delta(...)")
    ngroups = -(-cols // group)
    rows_pad = -(-max(rows, 1) // ROW_PAD) * ROW_PAD
    S = -(-(ngroups * n) // NIBBLE_CHUNK) * NIBBLE_CHUNK
    padded = torch.zeros(rows, ngroups * group, dtype=w.dtype, device=w.device)
    padded[:, :cols] = w
    g = padded.view(rows, ngroups, group)
    # non-zeros first, ascending column inside each group (stable sort of the "is zero" key)
    order = torch.sort((g == 0).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    vals = torch.gather(g, -1, order)
    values = torch.zeros(rows_pad, S, dtype=w.dtype, device=w.device)
    values[:rows, : ngroups * n] = vals.reshape(rows, ngroups * n)
    nib = torch.zeros(rows_pad, S, dtype=torch.uint8, device=w.device)
    nib[:rows, : ngroups * n] = order.reshape(rows, ngroups * n).to(torch.uint8)
    nib = nib.view(rows_pad, S // NIBBLE_CHUNK, 2, NIBBLE_CHUNK // 2)
    index = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(rows_pad, S // 2).contiguous()
    return KernelMatrix("nibble", (rows, cols), values, index, None, group, n, int((w != 0).sum()))


def _delta_plan(w: torch.Tensor):
    """Per non-zero: row, column, its entry slot inside the row, and each row's padded entry count."""
    rows, cols = w.shape
    nz = (w != 0).nonzero()
    r, c = nz[:, 0], nz[:, 1]
    prev = torch.full_like(c, -1)
    if c.numel() > 1:
        same = r[1:] == r[:-1]
        prev[1:] = torch.where(same, c[:-1], prev[1:])
    gap = c - prev - 1
    fill = gap // 16  # filler entries before this non-zero
    own = fill + 1
    incl = torch.cumsum(own, 0)
    row_len = torch.zeros(rows, dtype=torch.int64, device=w.device)
    row_len.index_add_(0, r, own)
    row_start_cum = torch.cumsum(row_len, 0) - row_len  # unpadded offsets, to localise incl
    slot = incl - 1 - row_start_cum[r]
    padded = -(-row_len // DELTA_CHUNK) * DELTA_CHUNK
    return r, c, slot, gap - 16 * fill, padded


def pack_delta(w: torch.Tensor, *, dtype: torch.dtype | None = None) -> KernelMatrix:
    """Pack any dense matrix (unstructured mask) into the ``delta`` layout (module docstring)."""
    _check_matrix(w, "w")
    w = w.to(dtype or w.dtype)
    rows, cols = w.shape
    r, c, slot, d, padded = _delta_plan(w)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(padded, 0)
    total = int(row_ptr[-1])
    if total >= 2**31:
        raise ValueError(f"matrix {rows}x{cols} needs {total} delta entries, more than int32 offsets hold")
    pos = row_ptr[r] + slot
    values = torch.zeros(total, dtype=w.dtype, device=w.device)
    values[pos] = w[r, c]
    deltas = torch.full((total,), 15, dtype=torch.uint8, device=w.device)
    deltas[pos] = d.to(torch.uint8)
    halves = deltas.view(-1, 2, DELTA_CHUNK // 2)
    index = (halves[:, 0] | (halves[:, 1] << 4)).reshape(-1).contiguous()
    return KernelMatrix("delta", (rows, cols), values, index, row_ptr.to(torch.int32), 0, 0, int(r.numel()))


def pack_dense(w: torch.Tensor, *, dtype: torch.dtype | None = None) -> KernelMatrix:
    """Keep the matrix dense (cuBLAS path)."""
    _check_matrix(w, "w")
    w = w.to(dtype or w.dtype).contiguous()
    return KernelMatrix("dense", tuple(w.shape), w, nnz=int((w != 0).sum()))


def _nibble_columns(k: KernelMatrix) -> torch.Tensor:
    """Column of every slot of a ``nibble`` matrix: ``[rows_pad, S]`` int64."""
    rows_pad, S = k.values.shape
    b = k.index.view(rows_pad, S // NIBBLE_CHUNK, 1, NIBBLE_CHUNK // 2)
    nib = torch.cat([b & 15, b >> 4], dim=2).reshape(rows_pad, S).long()
    s = torch.arange(S, device=k.values.device)
    return (s // k.per_group) * k.group + nib


def _delta_columns(k: KernelMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every entry of a ``delta`` matrix (int64 ``[total]`` each)."""
    halves = k.index.view(-1, 1, DELTA_CHUNK // 2)
    d = torch.cat([halves & 15, halves >> 4], dim=1).reshape(-1).long() + 1
    counts = (k.row_ptr[1:] - k.row_ptr[:-1]).long()
    row = torch.repeat_interleave(torch.arange(k.shape[0], device=d.device), counts)
    csum = torch.cumsum(d, 0)
    start = k.row_ptr[:-1].long()
    base = torch.where(start > 0, csum[(start - 1).clamp(min=0)], torch.zeros_like(start))
    return row, csum - base[row] - 1


def unpack(k: KernelMatrix, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``[rows, cols]`` copy of a kernel matrix (pure torch, any device)."""
    rows, cols = k.shape
    dtype = dtype or k.dtype
    if k.layout == "dense":
        return k.values.to(dtype).clone()
    out = torch.zeros(rows, cols + 16 * 17, dtype=torch.float32, device=k.device)  # room for stray pad columns
    if k.layout == "nibble":
        col = _nibble_columns(k)[:rows]
        v = k.values[:rows].float()
        keep = v != 0
        rr = torch.arange(rows, device=k.device)[:, None].expand_as(col)
        out.index_put_((rr[keep], col[keep]), v[keep], accumulate=True)
    elif k.layout == "delta":
        row, col = _delta_columns(k)
        v = k.values.float()
        keep = v != 0
        out.index_put_((row[keep], col[keep]), v[keep], accumulate=True)
    else:
        raise ValueError(f"unknown layout {k.layout!r}")
    return out[:, :cols].to(dtype)


def nibble_bytes(rows: int, cols: int, per_group: int, group: int = 16, value_bytes: int = 2) -> int:
    """Bytes of a ``nibble`` matrix (padding included), for choosing layouts and budgets."""
    S = math.ceil(math.ceil(cols / group) * per_group / NIBBLE_CHUNK) * NIBBLE_CHUNK
    return math.ceil(rows / ROW_PAD) * ROW_PAD * S * (value_bytes + 0.5)
