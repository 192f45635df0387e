"""Matrix layouts (docs/format.md, "Tensor names"): the stored ones ``dense``, ``csr``, ``bitmask``, ``bsr``, and
the GPU kernels' ``nibble`` and ``delta``, which are stored the same way.

Each layout is a frozen dataclass of named tensors plus its ``shape`` (and the scalars named in ``options``) with
``from_dense``, ``from_packed``, ``to_dense``, ``dense_rows``, ``matmul(x, out_dtype)``, ``to_tensors(prefix)``,
``from_tensors(tensors, prefix, shape, **options)``, ``validate(prefix)``, ``nnz``, ``nbytes`` and ``meta()``. All
of it is pure torch and runs on any device, except that ``nibble``/``delta`` ``matmul`` calls the Triton kernels of
``dsf_runtime.kernels`` where they run (``kernel_ready``).

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

from dsf_runtime.formats._common import (
    CODE_DTYPES,
    INT4,
    INT4_GROUP_SIZES,
    VALUE_DTYPES,
    FormatError,
    PackedMatrix,
    dtype_name,
    int4_group_count,
    pack_int4,
    part_name,
    unpack_int4,
)
from dsf_runtime.formats.balanced import balanced_per_group
from dsf_runtime.formats.bitmask import BitmaskMatrix
from dsf_runtime.formats.bsr import BLOCK_SIZES, BSRMatrix
from dsf_runtime.formats.csr import INT16_MAX_COLS, CSRMatrix
from dsf_runtime.formats.delta import DeltaMatrix, delta_entries
from dsf_runtime.formats.dense import DenseMatrix
from dsf_runtime.formats.nibble import NibbleMatrix, group_counts, nibble_bytes
from dsf_runtime.formats.tile import TileMatrix, tile_bytes

__all__ = [
    "AUTO",
    "AUTO_LAYOUTS",
    "BLOCK_SIZES",
    "CODE_DTYPES",
    "INT4",
    "INT4_GROUP_SIZES",
    "INT16_MAX_COLS",
    "LAYOUTS",
    "VALUE_DTYPES",
    "BSRMatrix",
    "BitmaskMatrix",
    "CSRMatrix",
    "DeltaMatrix",
    "DenseMatrix",
    "FormatError",
    "NibbleMatrix",
    "PackedMatrix",
    "TileMatrix",
    "check_meta",
    "dtype_name",
    "from_meta",
    "int4_group_count",
    "kernel_layout",
    "pack",
    "pack_factors",
    "pack_int4",
    "smallest",
    "tile_bytes",
    "unpack_int4",
]

LAYOUTS: dict[str, type] = {
    "dense": DenseMatrix,
    "csr": CSRMatrix,
    "bitmask": BitmaskMatrix,
    "bsr": BSRMatrix,
    "nibble": NibbleMatrix,
    "delta": DeltaMatrix,
    "tile": TileMatrix,
}


# ``pack(matrix, AUTO)``: the smallest of these stored layouts, which the CPU runs without a dense copy (bitmask
# through the compiled kernel); the first wins a tie. ``bsr`` only wins on block-structured masks and the GPU layouts
# are chosen at load time on CUDA (``kernel_layout``), so neither is a candidate.
AUTO = "auto"
AUTO_LAYOUTS = ("bitmask", "csr", "dense")


def _layout_class(layout: str) -> type:
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}") from None


def _code_options(scales: torch.Tensor | None, group_size: int | None) -> dict[str, Any]:
    """``from_dense`` keywords of codes: ``scales``, and ``group_size`` for int4."""
    if scales is None:
        if group_size is not None:
            raise ValueError("group_size goes with int4 codes and their scales")
        return {}
    return {"scales": scales, **({"group_size": group_size} if group_size is not None else {})}


def pack(matrix: torch.Tensor, layout: str, *, dtype: torch.dtype | None = None,
         scales: torch.Tensor | None = None, group_size: int | None = None, **opts: Any) -> PackedMatrix:
    """Pack a dense ``[rows, cols]`` matrix into ``layout`` with values in ``dtype`` (default: its own).

    Args:
        matrix: the matrix, float16/bfloat16/float32, any device; or codes (``CODE_DTYPES``, or int4 codes as
            int8 in [-7, 7]) with ``scales``.
        layout: a key of ``LAYOUTS``, or ``AUTO`` for ``smallest``.
        dtype: value dtype of the packed matrix.
        scales: ``[rows]`` row scales of codes (value = code · scale), or int4's ``[rows, ceil(cols / group_size)]``
            group scales; only ``dense``, ``csr`` and ``bitmask`` store codes.
        group_size: int4 codes: columns per scale (``INT4_GROUP_SIZES``).
        **opts: layout options, e.g. ``block_size=32`` for ``bsr``.
    """
    codes = _code_options(scales, group_size)
    if layout == AUTO:
        return smallest(matrix, dtype=dtype, **codes)
    cls = _layout_class(layout)
    if codes and layout not in AUTO_LAYOUTS:
        raise ValueError(f"layout {layout!r} has no quantized values; use one of {list(AUTO_LAYOUTS)} for "
                         f"{'int4' if group_size else dtype_name(matrix.dtype)} codes, or decode them first")
    return cls.from_dense(matrix, dtype=dtype, **codes, **opts)


def smallest(matrix: torch.Tensor, *, dtype: torch.dtype | None = None,
             scales: torch.Tensor | None = None, group_size: int | None = None) -> PackedMatrix:
    """``matrix`` ``[rows, cols]`` packed into each of ``AUTO_LAYOUTS`` with values in ``dtype`` (or codes with
    ``scales`` and int4's ``group_size``); the one with the fewest stored bytes (``nbytes``), the earlier layout on
    a tie."""
    codes = _code_options(scales, group_size)
    return min((_layout_class(layout).from_dense(matrix, dtype=dtype, **codes) for layout in AUTO_LAYOUTS),
               key=lambda packed: packed.nbytes)


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
            ``block_size``, ``bit_order``, and the layout's ``options`` such as ``group``/``per_group``).
        validate: run the full index validation (``validate(prefix)``).

    ``meta`` tensors (shapes and dtypes only, e.g. ``CompressedCheckpoint.layer_skeleton``) give a matrix whose
    counts are checked later, with ``check_meta``.

    Raises:
        FormatError: naming the tensor that is missing, mistyped, inconsistent or disagrees with ``meta``.
    """
    cls = _layout_class(meta["layout"])
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    options = {k: meta.get(k) for k in cls.options}
    packed = cls.from_tensors(tensors, prefix, shape, validate=validate, **options)
    if not packed.values.is_meta:
        check_meta(packed, prefix, meta)
    return packed


def check_meta(packed: PackedMatrix, prefix: str, meta: Mapping[str, Any]) -> None:
    """Check that ``packed`` (with data) has the manifest's ``dtype``, ``index_dtype``, ``bit_order`` and ``nnz``
    (``from_meta`` does it; a loader that builds ``meta`` tensors first calls it once the data is in).

    Raises:
        FormatError: naming the tensor that disagrees.
    """
    found = packed.meta()
    for key, part in (("dtype", "values"), ("index_dtype", "col_idx"), ("bit_order", "bitmask"), ("nnz", "values"),
                      ("scale_dtype", "scales"), ("group_size", "scales")):
        if meta.get(key) != found.get(key):
            raise FormatError(
                part_name(prefix, part if part in packed.stored_parts else "values"),
                f"has {key} {found.get(key)!r} but the manifest says {meta.get(key)!r}",
                "re-export the checkpoint; the manifest and the tensors come from different writes",
            )


def _float8_kernels(device: torch.device) -> bool:
    """Whether Triton kernels on ``device`` read float8 e4m3 codes: CUDA from compute capability 8.9 (Ada,
    Hopper) on; the CPU interpreter too."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def kernel_layout(matrix: PackedMatrix, dtype: torch.dtype | None = None) -> PackedMatrix:
    """The GPU kernels' layout with the fewest bytes for ``matrix`` (any layout), values in ``dtype``.

    ``nibble`` (preferred within 10% of ``delta``: its decode is faster), ``delta``, or ``dense`` when neither saves
    10% over the dense matrix. A ``nibble``/``delta`` matrix, or a ``dense`` one that stays dense, is returned as it
    is (cast only). Otherwise one dense temporary of the matrix is made on its device. Codes (int8, float8, int4)
    stay codes when ``nibble`` is chosen and ``dtype`` is None or the scales' dtype (its decode kernel reads and
    scales them; float8 only where Triton has the type, CUDA compute capability ≥ 8.9); otherwise, and when
    ``delta`` or ``dense`` is chosen, they are decoded into ``dtype`` (default: the scales' dtype).
    """
    if isinstance(matrix, (NibbleMatrix, DeltaMatrix, TileMatrix)):
        codes_as_they_are = matrix.quantized and dtype == matrix.compute_dtype
        return matrix if dtype in (None, matrix.dtype) or codes_as_they_are else matrix.to(dtype=dtype)
    keep_codes = (matrix.quantized and dtype in (None, matrix.compute_dtype)
                  and (matrix.dtype != torch.float8_e4m3fn or _float8_kernels(matrix.device)))
    dense = matrix.to_dense(dtype or matrix.compute_dtype)
    codes = matrix.dense_codes() if keep_codes else None
    rows, cols = dense.shape
    vb = dense.element_size()
    counts = group_counts(dense if codes is None else codes, 16)
    per_group = max(int(counts.max()) if counts.numel() else 1, 1)
    code_bytes = 0.5 if matrix.group_size is not None else 1
    b_nibble = nibble_bytes(rows, cols, per_group, 16, code_bytes if keep_codes else vb)
    b_delta = int(delta_entries(dense)[4].sum()) * (vb + 0.5) + 4 * (rows + 1)
    if min(b_nibble, b_delta) > 0.9 * rows * cols * vb:
        keep = isinstance(matrix, DenseMatrix) and dense.dtype == matrix.dtype
        return matrix if keep else DenseMatrix.from_dense(dense)
    if b_nibble <= 1.1 * b_delta:
        if codes is not None:
            return NibbleMatrix.from_dense(codes, per_group=per_group, **matrix.code_options())
        return NibbleMatrix.from_dense(dense, per_group=per_group)
    return DeltaMatrix.from_dense(dense)
