"""Packed matrix formats: ``dense``, ``csr``, ``bitmask`` and ``bsr`` (docs/format.md, "Tensor names").

Each format is a frozen dataclass of named tensors plus its ``shape`` with ``from_dense``, ``to_dense``,
``dense_rows``, ``to_tensors(prefix)``, ``from_tensors(tensors, prefix, shape)``, ``validate(prefix)``, ``nnz``,
``nbytes`` and ``meta()``. Everything is pure torch and runs on any device.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 1.5], [0.0, 0.0], [2.0, -1.0]], dtype=torch.float16)
    >>> packed = pack(w, "csr")
    >>> packed.values.tolist(), packed.col_idx.tolist(), packed.row_ptr.tolist()
    ([1.5, 2.0, -1.0], [1, 0, 1], [0, 1, 1, 3])
    >>> torch.equal(packed.to_dense(), w)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dsf_runtime.formats._common import VALUE_DTYPES, FormatError, PackedMatrix, dtype_name, part_name
from dsf_runtime.formats.balanced import balanced_per_group
from dsf_runtime.formats.bitmask import BitmaskMatrix
from dsf_runtime.formats.bsr import BLOCK_SIZES, BSRMatrix
from dsf_runtime.formats.csr import INT16_MAX_COLS, CSRMatrix
from dsf_runtime.formats.dense import DenseMatrix

__all__ = [
    "BLOCK_SIZES",
    "INT16_MAX_COLS",
    "LAYOUTS",
    "VALUE_DTYPES",
    "BSRMatrix",
    "BitmaskMatrix",
    "CSRMatrix",
    "DenseMatrix",
    "FormatError",
    "PackedMatrix",
    "dtype_name",
    "from_meta",
    "pack",
    "pack_factors",
]

LAYOUTS: dict[str, type] = {
    "dense": DenseMatrix,
    "csr": CSRMatrix,
    "bitmask": BitmaskMatrix,
    "bsr": BSRMatrix,
}


def _layout_class(layout: str) -> type:
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}") from None


def pack(matrix: torch.Tensor, layout: str, *, dtype: torch.dtype | None = None, **opts: Any) -> PackedMatrix:
    """Pack a dense ``[rows, cols]`` matrix into ``layout`` with values in ``dtype`` (default: its own).

    Args:
        matrix: the matrix, float16/bfloat16/float32, any device.
        layout: a key of ``LAYOUTS``.
        dtype: value dtype of the packed matrix.
        **opts: layout options, e.g. ``block_size=32`` for ``bsr``.
    """
    return _layout_class(layout).from_dense(matrix, dtype=dtype, **opts)


def pack_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    layout: str,
    *,
    dtype: torch.dtype | None = None,
    drop_empty: bool = True,
    **opts: Any,
) -> dict[str, PackedMatrix]:
    """Pack DSF factors ``A`` [out, k] and ``B`` [k, in] (``W ≈ A·B``) into ``layout``.

    With ``drop_empty`` every inner index ``t`` where ``A[:, t]`` or ``B[t, :]`` is all zero after the cast to
    ``dtype`` is dropped (docs/format.md, "Inner dimension"); the others keep their order, so the packed factors
    have inner dimension ``r <= k`` and ``A·B`` is unchanged. Nothing is dropped when ``A`` is balanced
    (``balanced_per_group``: solved with ``group_size=16``): removing a column would shift its groups, and the
    GPU kernels' ``nibble`` layout needs at most ``N`` non-zeros per group. The compression output keeps ``r = k``
    (``drop_empty=False``).

    Returns:
        ``{"A": packed [out, r], "B": packed [r, in]}``.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(
            f"factors do not chain: A is {list(A.shape)}, B is {list(B.shape)}; expected [out, k] and [k, in]"
        )
    a, b = A.to(dtype or A.dtype), B.to(dtype or B.dtype)
    if drop_empty:
        keep = torch.nonzero((a != 0).any(dim=0) & (b != 0).any(dim=1)).squeeze(1)
        if len(keep) < a.shape[1] and balanced_per_group(a) is None:
            a, b = a[:, keep], b[keep]
    return {"A": pack(a, layout, **opts), "B": pack(b, layout, **opts)}


def from_meta(
    tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any], *, validate: bool = True
) -> PackedMatrix:
    """Rebuild a packed matrix from its tensors and its manifest entry, checking that they agree.

    Args:
        tensors: at least ``<prefix>.<part>`` for every part of the layout.
        prefix: e.g. ``"model.layers.0.mlp.down_proj.A"``.
        meta: the manifest's per-factor dict (``shape``, ``layout``, ``dtype``, ``nnz``, ``index_dtype``,
            ``block_size``, ``bit_order``).
        validate: run the full index validation (``validate(prefix)``).

    Raises:
        FormatError: naming the tensor that is missing, mistyped, inconsistent or disagrees with ``meta``.
    """
    cls = _layout_class(meta["layout"])
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    extra = {"block_size": meta.get("block_size")} if cls is BSRMatrix else {}
    packed = cls.from_tensors(tensors, prefix, shape, validate=validate, **extra)
    found = packed.meta()
    for key, part in (("dtype", "values"), ("index_dtype", "col_idx"), ("bit_order", "bitmask"), ("nnz", "values")):
        if meta.get(key) != found[key]:
            raise FormatError(
                part_name(prefix, part if part in cls.parts else "values"),
                f"has {key} {found[key]!r} but the manifest says {meta.get(key)!r}",
                "re-export the checkpoint; the manifest and the tensors come from different writes",
            )
    return packed
