"""Quantize the values of a sparse (or dense) weight, keeping its mask: int8, fp8 e4m3 or int4 codes plus scales.

A ``QuantizedMatrix`` holds the kept values of a matrix ``W`` [out, in] in row-major mask order (the order of
``W[mask]``, i.e. CSR value order) as codes, and their scales; the mask itself is the index layout's job and is
not counted in ``nbytes``. Three value formats, one frozen class each:

* ``Int8Values``: symmetric int8 codes in [-127, 127], one scale per output row;
* ``Fp8Values``: ``torch.float8_e4m3fn`` codes (|code| <= 448), one scale per output row;
* ``Int4Values(group_size)``: symmetric int4 codes in [-7, 7], packed two per byte (low nibble first) in
  row-major mask order, one scale per group of ``group_size`` (64, 128 or 256) consecutive columns of a row.

Scales are fp16, computed as ``amax / qmax`` (qmax = 127, 448, 7) in fp32 and rounded **up** to the next fp16
value, so no kept value clips under round-to-nearest; a row or group whose kept values are all zero gets scale
1.0. Every scale is finite and > 0 (an ``amax/qmax`` above the fp16 range raises). Bytes of a matrix [out, in]
with ``nnz`` kept values: int8 and fp8 ``nnz + 2·out``; int4 ``ceil(nnz/2) + 2·out·ceil(in/g)``. These are the
files' encodings (docs/format.md "Quantized values").

Two algorithms, the same code path for sparse and dense (all-ones mask) weights:

* round-to-nearest (``quantize_rtn``);
* error feedback (``quantize_gptq``): GPTQ restricted to the mask. Columns are quantized left to right in blocks
  (lazy batch updates); each column's scaled error ``(w − q)/[Hinv]_ii`` is spread over the not-yet-quantized
  columns through the upper Cholesky factor ``Hinv`` of the damped ``H⁻¹`` (SparseGPT's conventions and helper),
  but only into kept positions, so pruned weights stay exactly zero.

``quantize_dsf`` quantizes DSF factors: ``B`` first with error feedback under ``H``; then refits ``A``'s kept
values against ``B̂`` under ``H`` (DSF's ``finalize``, 20 ADMM steps by default), and quantizes ``A`` with error
feedback under its own curvature ``H_A = B̂·H·B̂ᵀ``. docs/quantized-values.md has the measurements.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from compress.solvers.base import (
    SolveResult,
    exact_fp32,
    layer_error,
    layer_prefix,
    remove_dead_inputs,
    validate_layer,
)
from compress.solvers.dsf import refit_left
from compress.solvers.sparsegpt import inverse_cholesky
from dsf_runtime.formats import INT4_GROUP_SIZES, int4_group_count, pack_int4, unpack_int4

__all__ = [
    "FORMATS",
    "QUANTIZE_VERSION",
    "Fp8Values",
    "Int4Values",
    "Int8Values",
    "QuantizedDSF",
    "QuantizedMatrix",
    "ValueFormat",
    "balance_factors",
    "ValueQuantization",
    "encode",
    "quantize_dense",
    "quantize_dsf",
    "quantize_embedding",
    "quantize_result",
    "codes_of",
    "quantize_gptq",
    "quantize_rtn",
    "value_format",
]

SCALE_DTYPE = torch.float16
# Version of the quantized factors a run stores: a resumed run must have quantized its stored blocks the same way
# (2: DSF factors balanced before quantization, ``balance_factors``).
QUANTIZE_VERSION = 2
_FP16_INF = torch.tensor(math.inf, dtype=SCALE_DTYPE)


@dataclass(frozen=True)
class ValueFormat(ABC):
    """How the kept values of a matrix are coded; subclasses fix the code type and the scale granularity."""

    name: ClassVar[str]
    qmax: ClassVar[float]  # largest code magnitude
    code_dtype: ClassVar[torch.dtype]  # dtype of the stored codes
    per_row: ClassVar[bool]  # one scale per row (fixed before error feedback) rather than per group

    @abstractmethod
    def slots(self, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Scale slot of every position and the number of scales.

        Args:
            mask: bool [out, in].

        Returns:
            ``(slot, count)``: slot long [out, in] (meaningful at kept positions), ``count`` scales stored.
        """

    @abstractmethod
    def stored_bytes(self, mask: torch.Tensor) -> int:
        """Stored bytes (codes + scales) of the kept values of ``mask`` [out, in]."""

    @abstractmethod
    def round(self, scaled: torch.Tensor) -> torch.Tensor:
        """Nearest codes of ``w / scale`` (fp32, any shape), clamped to the code range; unpacked code tensor."""

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The real values (before scaling) of unpacked codes, fp32."""
        return codes.float()

    def pack(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stored form of the unpacked codes [nnz] of ``mask`` (identity except int4)."""
        return codes

    def unpack(self, stored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unpacked codes [nnz] from the stored form (identity except int4)."""
        return stored

    def stored_codes(self, nnz: int) -> int:
        """Number of stored code elements for ``nnz`` kept values."""
        return nnz

    def scales(self, amax: torch.Tensor, layer_name: str | None) -> torch.Tensor:
        """fp16 scales [S] from the fp32 amax [S] of each slot: ``amax/qmax`` rounded up to fp16, 1.0 for amax 0.

        Raises:
            ValueError: naming the layer when a scale overflows fp16 or ``amax`` is NaN/Inf.
        """
        exact = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
        scales = exact.to(SCALE_DTYPE)
        low = scales.float() < exact
        scales = torch.where(low, torch.nextafter(scales, _FP16_INF.to(scales.device)), scales)
        check_scales(scales, layer_name)
        return scales


@dataclass(frozen=True)
class _RowScaled(ValueFormat):
    """One scale per output row (also for rows with no kept value), stored as [out]."""

    per_row: ClassVar[bool] = True

    def slots(self, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1)
        return rows.expand(mask.shape), mask.shape[0]

    def stored_bytes(self, mask: torch.Tensor) -> int:
        return int(mask.sum()) * self.code_dtype.itemsize + mask.shape[0] * SCALE_DTYPE.itemsize


@dataclass(frozen=True)
class Int8Values(_RowScaled):
    """Symmetric int8: codes in [-127, 127] (int8), one fp16 scale per row; value = code·scale."""

    name: ClassVar[str] = "int8"
    qmax: ClassVar[float] = 127.0
    code_dtype: ClassVar[torch.dtype] = torch.int8

    def round(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round().clamp_(-self.qmax, self.qmax).to(torch.int8)


@dataclass(frozen=True)
class Fp8Values(_RowScaled):
    """fp8 e4m3 (``torch.float8_e4m3fn``, round-to-nearest-even), |code| <= 448, one fp16 scale per row."""

    name: ClassVar[str] = "fp8"
    qmax: ClassVar[float] = 448.0
    code_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn

    def round(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.clamp(-self.qmax, self.qmax).to(torch.float8_e4m3fn)


@dataclass(frozen=True)
class Int4Values(ValueFormat):
    """Symmetric int4: codes in [-7, 7], one fp16 scale per group of ``group_size`` consecutive columns of a row.

    A row has ``ceil(in/g)`` groups whatever its mask, so the scales ``[out·ceil(in/g)]`` (row-major) do not depend
    on which values are kept: every index layout, and a dense matrix, stores them unchanged, and a code that rounds
    to 0 may be dropped from the index. The codes of the kept values are stored in row-major mask order, two per
    byte, low nibble first, two's complement (``dsf_runtime.formats.pack_int4``; an odd count ends with a zero
    nibble) — the files' encoding (docs/format.md "Quantized values").
    """

    group_size: int = 128
    name: ClassVar[str] = "int4"
    qmax: ClassVar[float] = 7.0
    code_dtype: ClassVar[torch.dtype] = torch.uint8
    per_row: ClassVar[bool] = False
    GROUP_SIZES: ClassVar[tuple[int, ...]] = INT4_GROUP_SIZES

    def __post_init__(self) -> None:
        check_group_size(self.group_size, None)

    def slots(self, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = mask.shape
        groups = int4_group_count(cols, self.group_size)
        row = torch.arange(rows, device=mask.device).unsqueeze(1) * groups
        return row + torch.arange(cols, device=mask.device) // self.group_size, rows * groups

    def stored_bytes(self, mask: torch.Tensor) -> int:
        groups = int4_group_count(mask.shape[1], self.group_size)
        return (int(mask.sum()) + 1) // 2 + mask.shape[0] * groups * SCALE_DTYPE.itemsize

    def round(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round().clamp_(-self.qmax, self.qmax).to(torch.int8)

    def stored_codes(self, nnz: int) -> int:
        return (nnz + 1) // 2

    def pack(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pack_int4(codes)

    def unpack(self, stored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return unpack_int4(stored, 0, int(mask.sum()))


FORMATS: dict[str, type[ValueFormat]] = {"int8": Int8Values, "fp8": Fp8Values, "int4": Int4Values}


def check_group_size(group_size: int, layer_name: str | None) -> None:
    """Raise ``ValueError`` (naming the layer) unless ``group_size`` is one of ``Int4Values.GROUP_SIZES``."""
    if isinstance(group_size, bool) or group_size not in Int4Values.GROUP_SIZES:
        raise ValueError(
            f"{layer_prefix(layer_name)}int4 group size must be one of {Int4Values.GROUP_SIZES}, got {group_size!r}"
        )


def value_format(name: str, *, group_size: int | None = None, layer_name: str | None = None) -> ValueFormat:
    """The format called ``name`` (``"int8"``, ``"fp8"``, ``"int4"``), e.g. from a CLI flag or a manifest.

    Args:
        name: format name.
        group_size: int4 only, 64, 128 or 256 (default 128).
        layer_name: put into error messages.

    Raises:
        ValueError: naming the layer for an unknown format, a bad group size, or a group size for a row format.
    """
    where = layer_prefix(layer_name)
    if name not in FORMATS:
        raise ValueError(f"{where}unknown value format {name!r}; valid formats: {', '.join(FORMATS)}")
    if name != "int4":
        if group_size is not None:
            raise ValueError(f"{where}{name} has one scale per row; group_size applies to int4 only")
        return FORMATS[name]()
    size = 128 if group_size is None else group_size
    check_group_size(size, layer_name)
    return Int4Values(size)


def check_scales(scales: torch.Tensor, layer_name: str | None) -> None:
    """Raise ``ValueError`` (naming the layer) unless ``scales`` are fp16, finite and > 0."""
    where = layer_prefix(layer_name)
    if scales.dtype != SCALE_DTYPE:
        raise ValueError(f"{where}scales must be {SCALE_DTYPE}, got {scales.dtype}")
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}scale {index} is {float(scales[index])!r}; every scale must be finite and > 0 "
            f"({int(bad.sum())} of {scales.numel()} are not)"
        )


@dataclass(frozen=True)
class QuantizedMatrix:
    """The kept values of a matrix [out, in] as codes and fp16 scales; validated on construction.

    Attributes:
        format: the value format.
        mask: bool [out, in], the kept positions (the index layout's job; not counted in ``nbytes``).
        codes: stored codes of the kept values in row-major mask order: int8 [nnz], float8_e4m3fn [nnz], or
            uint8 [ceil(nnz/2)] packed int4 (one nibble stream).
        scales: fp16, [out] for int8/fp8, [out·ceil(in/g)] (row-major column groups) for int4.
        layer_name: put into error messages.
    """

    format: ValueFormat
    mask: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    layer_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = layer_prefix(self.layer_name)
        if self.mask.dtype != torch.bool or self.mask.dim() != 2:
            raise ValueError(f"{where}mask must be a 2-D bool tensor, got {self.mask.dtype} {tuple(self.mask.shape)}")
        if self.codes.dtype != self.format.code_dtype:
            raise ValueError(
                f"{where}{self.format.name} codes must be {self.format.code_dtype}, got {self.codes.dtype}"
            )
        expected = self.format.stored_codes(int(self.mask.sum()))
        if tuple(self.codes.shape) != (expected,):
            raise ValueError(f"{where}expected {expected} stored codes for this mask, got {tuple(self.codes.shape)}")
        check_scales(self.scales, self.layer_name)
        count = self.format.slots(self.mask)[1]
        if tuple(self.scales.shape) != (count,):
            raise ValueError(f"{where}expected {count} scales for this mask, got {tuple(self.scales.shape)}")

    @property
    def nbytes(self) -> int:
        """Stored bytes of codes and scales (equals ``format.stored_bytes(mask)``)."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def value_scales(self) -> torch.Tensor:
        """The fp32 scale of every kept value, [nnz] in row-major mask order."""
        slot, _ = self.format.slots(self.mask)
        return self.scales.float()[slot[self.mask]]

    def dequantize(self) -> torch.Tensor:
        """The represented matrix, fp32 [out, in], exactly zero outside the mask (``code·scale`` is exact in fp32)."""
        values = self.format.values(self.format.unpack(self.codes, self.mask)) * self.value_scales()
        dense = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device)
        return dense.masked_scatter_(self.mask, values)


def encode(
    format: ValueFormat, values: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, layer_name: str | None = None
) -> QuantizedMatrix:
    """Round ``values`` at ``mask`` to the nearest codes under given ``scales`` (``quantize_rtn`` with fixed scales).

    Args:
        values: [out, in] float; entries outside ``mask`` are ignored.
        mask: bool [out, in].
        scales: fp16, one per slot of ``format.slots(mask)``.
    """
    slot, _ = format.slots(mask)
    kept = values.float()[mask] / scales.float()[slot[mask]]
    return QuantizedMatrix(format, mask, format.pack(format.round(kept), mask), scales, layer_name)


def _slot_amax(values: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, count: int) -> torch.Tensor:
    """Largest |value| of the kept entries of each slot, fp32 [count] (0 for a slot without kept values)."""
    amax = torch.zeros(count, dtype=torch.float32, device=values.device)
    return amax.scatter_reduce_(0, slot[mask], values.float()[mask].abs(), "amax")


def _check_weight(weight: torch.Tensor, mask: torch.Tensor | None, layer_name: str | None) -> torch.Tensor:
    """Validated bool mask [out, in] for ``weight`` (``weight != 0`` when ``mask`` is None).

    Raises:
        ValueError: naming the layer for a non-float or non-finite weight or a mask of the wrong shape/dtype.
    """
    where = layer_prefix(layer_name)
    if not weight.is_floating_point() or weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{where}unsupported weight dtype {weight.dtype}; pass fp32, fp16, bf16 or fp64 values")
    if weight.dim() != 2:
        raise ValueError(f"{where}weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}weight contains NaN or Inf")
    if mask is None:
        return weight != 0
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"{where}mask must be bool of the weight's shape {tuple(weight.shape)}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    return mask.to(weight.device)


def quantize_rtn(
    weight: torch.Tensor, format: ValueFormat, *, mask: torch.Tensor | None = None, layer_name: str | None = None
) -> QuantizedMatrix:
    """Round-to-nearest: scales from the kept values' amax per slot, then the nearest code of every kept value.

    Args:
        weight: W [out, in], float.
        format: value format.
        mask: bool [out, in] kept positions; default ``W != 0``. Codes exist only at kept positions.
        layer_name: put into error messages.

    Returns:
        The quantized matrix; every kept value is within half a step of its code·scale (no clipping).
    """
    mask = _check_weight(weight, mask, layer_name)
    slot, count = format.slots(mask)
    scales = format.scales(_slot_amax(weight, mask, slot, count), layer_name)
    return encode(format, weight, mask, scales, layer_name)


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    format: ValueFormat,
    *,
    mask: torch.Tensor | None = None,
    through_pruned: bool = True,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer_name: str | None = None,
) -> QuantizedMatrix:
    """Error feedback (GPTQ on the mask): quantize column by column, spreading each error over later columns.

    Conventions are SparseGPT's (``compress.solvers.sparsegpt``): dead inputs (``H_jj = 0``) get ``H_jj = 1`` and
    a zero column; ``Hinv`` is the upper Cholesky factor of ``(H + percdamp·mean(diag H)·I)⁻¹``; in column ``i``
    the scaled error ``e = (w − q)/Hinv_ii`` updates ``W[:, j] −= e·Hinv_ij`` for the later columns ``j`` of the
    block at once and for the columns after the block lazily (one GEMM per block).

    Pruned weights always come out exactly zero. With ``through_pruned`` (default) a pruned position is a weight
    whose only grid point is 0, as in SparseGPT's joint prune-and-quantize: it receives updates like any
    not-yet-quantized weight, and when its column is reached it is set to 0 and that error is spread on too.
    Without it the updates are multiplied by the mask, so pruned positions never move and only kept weights absorb
    the error. On real SmolLM2 layers the default gives 0.3–0.75× the masked variant's error
    (docs/quantized-values.md).

    Scales: int8/fp8 row scales are fixed before the sweep from the kept values of the masked row. An int4 group's
    scale is computed when the block containing the group's first kept value starts, from the group's current
    values (all earlier blocks' errors applied, this block's not yet: GPTQ reads the lazily-updated ``W`` the same
    way). Values pushed past ``qmax·scale`` by the feedback are clamped.

    Args:
        weight: W [out, in], float.
        hessian: H [in, in] = (2/N)·Σ xxᵀ of the layer input.
        format: value format.
        mask: bool [out, in] kept positions; default ``W != 0``.
        through_pruned: let the error flow through pruned positions (see above).
        blocksize: columns per lazy-update block.
        percdamp: damping of H as a fraction of its mean diagonal.
        layer_name: put into error messages.

    Raises:
        ValueError: for invalid inputs; RuntimeError: if the damped H is not positive definite.
    """
    mask = _check_weight(weight, mask, layer_name)
    weight, hessian = validate_layer(weight, hessian, layer_name)
    work, live = remove_dead_inputs(weight * mask, hessian)
    with exact_fp32():
        hinv = inverse_cholesky(live, percdamp, layer_name)
        scales = _feedback_sweep(work, hinv, mask, format, through_pruned, blocksize, layer_name)
    return encode(format, work, mask, scales, layer_name)


def _initial_scales(
    work: torch.Tensor, mask: torch.Tensor, format: ValueFormat, layer_name: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales before the sweep, fp16 [S], and for group formats the first column of every group, long [S].

    Row formats get their final scales here (first column None); group formats get placeholders 1.0.
    """
    slot, count = format.slots(mask)
    if format.per_row:
        return format.scales(_slot_amax(work, mask, slot, count), layer_name), None
    first = torch.full((count,), mask.shape[1], dtype=torch.long, device=work.device)
    columns = torch.arange(mask.shape[1], device=work.device).expand(mask.shape)
    first.scatter_reduce_(0, slot[mask], columns[mask], "amin")
    return torch.ones(count, dtype=SCALE_DTYPE, device=work.device), first


def _feedback_sweep(
    work: torch.Tensor,
    hinv: torch.Tensor,
    mask: torch.Tensor,
    format: ValueFormat,
    through_pruned: bool,
    blocksize: int,
    layer_name: str | None,
) -> torch.Tensor:
    """The GPTQ sweep of ``quantize_gptq``; overwrites ``work`` [out, in] fp32 with the dequantized values.

    Args:
        work: W·mask [out, in] (dead inputs zeroed); hinv: upper Cholesky factor of the damped H⁻¹ [in, in].

    Returns:
        The fp16 scales, one per slot of ``format.slots(mask)``.
    """
    slot, count = format.slots(mask)
    lookup = torch.where(mask, slot, count)  # pruned positions read the padding scale 1.0
    keep = mask.to(work.dtype)
    spread = None if through_pruned else keep
    scales, first = _initial_scales(work, mask, format, layer_name)
    for i1 in range(0, work.shape[1], blocksize):
        i2 = min(i1 + blocksize, work.shape[1])
        if first is not None:
            fresh = format.scales(_slot_amax(work, mask, slot, count), layer_name)
            scales = torch.where((first >= i1) & (first < i2), fresh, scales)
        block_scale = torch.cat([scales.float(), keep.new_ones(1)])[lookup[:, i1:i2]]
        block, hinv_block = work[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            w, s = block[:, i], block_scale[:, i]
            q = format.values(format.round(w / s)) * s * keep[:, i1 + i]
            errors[:, i] = (w - q) / hinv_block[i, i]
            update = torch.outer(errors[:, i], hinv_block[i, i:])
            block[:, i:] -= update if spread is None else update * spread[:, i1 + i : i2]
            block[:, i] = q
        update = errors @ hinv[i1:i2, i2:]
        work[:, i1:i2] = block
        work[:, i2:] -= update if spread is None else update * spread[:, i2:]
    return scales


def quantize_dense(
    weight: torch.Tensor,
    format: ValueFormat,
    *,
    hessian: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer_name: str | None = None,
) -> QuantizedMatrix:
    """Dense baseline: RTN (``hessian`` None) or GPTQ (with ``hessian``) of every weight (all-ones mask)."""
    mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if hessian is None:
        return quantize_rtn(weight, format, mask=mask, layer_name=layer_name)
    return quantize_gptq(
        weight, hessian, format, mask=mask, blocksize=blocksize, percdamp=percdamp, layer_name=layer_name
    )


@dataclass(frozen=True)
class QuantizedDSF:
    """Quantized DSF factors and their layer errors.

    Attributes:
        A: quantized output-side factor [out, k]; B: quantized input-side factor [k, in].
        error: ``tr(ΔW·H·ΔWᵀ)`` with ``ΔW = Â·B̂ − A·B`` (against the unquantized factors).
        weight_error: the same against the original ``W`` when one was passed, else None.
    """

    A: QuantizedMatrix
    B: QuantizedMatrix
    error: float
    weight_error: float | None

    def weight(self) -> torch.Tensor:
        """The represented weight ``Â·B̂``, fp32 [out, in]."""
        return self.A.dequantize() @ self.B.dequantize()


def quantize_dsf(
    left: torch.Tensor,
    right: torch.Tensor,
    hessian: torch.Tensor,
    format: ValueFormat,
    *,
    small_format: ValueFormat | None = None,
    weight: torch.Tensor | None = None,
    error_feedback: bool = True,
    refit_iters: int = 20,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer_name: str | None = None,
) -> QuantizedDSF:
    """Quantize DSF factors ``W ≈ A·B``, input side first.

    First the factors are balanced (``balance_factors``): ``A·D`` and ``D⁻¹·B`` with ``D`` making every column of
    ``A`` unit-RMS. The product is unchanged and ``B``'s row- and group-scaled quantization does not see ``D``,
    but ``A``'s row and group scales no longer mix inner indices of different magnitude.

    With error feedback: ``B̂ = quantize_gptq(B, H)``; then, unless ``refit_iters`` is 0, ``A``'s kept values are
    refitted against ``B̂`` under ``tr((A·B̂ − T)·H·(A·B̂ − T)ᵀ)`` (``T`` = ``weight`` if given, else ``A·B``)
    by ``refit_iters`` steps of DSF's ``finalize`` ADMM on ``A``'s mask; then ``Â = quantize_gptq(A, H_A)`` with
    ``H_A = B̂·H·B̂ᵀ`` [k, k]. Without error feedback both factors are rounded to nearest (no refit).

    Args:
        left: A [out, k]; right: B [k, in] (zeros outside their masks; the masks are ``!= 0``).
        hessian: H [in, in].
        format: value format of both factors, or of the larger one when ``small_format`` is given.
        small_format: value format of the factor with fewer kept values (``B`` on a tie), e.g. int8 next to an
            int4 ``format``: DSF's square factor stays close to the identity, and int4 crushes its off-diagonal
            entries (docs/quantized-values.md).
        weight: the original W [out, in], for ``weight_error`` and as the refit target.
        error_feedback: GPTQ on the masks (True) or round-to-nearest (False).
        refit_iters: finalize ADMM steps refitting A against B̂ (0 = no refit). The default 20 (the reference's
            finalize) lowered the error against W in every measured case, at 5–30% of the quantization time.
        blocksize, percdamp: as in ``quantize_gptq``.
        layer_name: put into error messages.

    Raises:
        ValueError: for invalid inputs; RuntimeError: if a damped Hessian is not positive definite.
    """
    left_mask = _check_weight(left, None, layer_name)
    right_mask = _check_weight(right, None, layer_name)
    if left.shape[1] != right.shape[0]:
        raise ValueError(
            f"{layer_prefix(layer_name)}factor shapes {tuple(left.shape)} and {tuple(right.shape)} do not chain"
        )
    left, right = left.float(), right.float()
    product = left @ right
    product, hessian = validate_layer(product, hessian, layer_name)
    target = product if weight is None else validate_layer(weight, hessian, layer_name)[0]
    left, right = balance_factors(left, right)
    format_a = format_b = format
    if small_format is not None:
        if int(right_mask.sum()) <= int(left_mask.sum()):
            format_b = small_format
        else:
            format_a = small_format
    if not error_feedback:
        quant_b = quantize_rtn(right, format_b, mask=right_mask, layer_name=layer_name)
        quant_a = quantize_rtn(left, format_a, mask=left_mask, layer_name=layer_name)
    else:
        options = dict(blocksize=blocksize, percdamp=percdamp, layer_name=layer_name)
        quant_b = quantize_gptq(right, hessian, format_b, mask=right_mask, **options)
        right_hat = quant_b.dequantize()
        if refit_iters:
            left = _refit_left(target, hessian, left, right_hat, left_mask, refit_iters, layer_name)
        hessian_a = right_hat @ hessian @ right_hat.T
        quant_a = quantize_gptq(left, hessian_a, format_a, mask=left_mask, **options)
    approx = quant_a.dequantize() @ quant_b.dequantize()
    error = layer_error(product, approx, hessian)[0]
    weight_error = None if weight is None else layer_error(target, approx, hessian)[0]
    return QuantizedDSF(quant_a, quant_b, error, weight_error)


def balance_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A·D, D⁻¹·B)`` for fp32 ``A`` [out, k], ``B`` [k, in], with ``D = diag(1/rms(A[:, j]))`` (1 for an
    all-zero column): every non-zero column of the returned ``A`` has unit root-mean-square, masks and the
    product are unchanged (up to fp32 rounding)."""
    rms = left.pow(2).mean(0).sqrt()
    scale = torch.where(rms > 0, rms, torch.ones_like(rms))
    return left / scale, right * scale[:, None]


def _refit_left(
    target: torch.Tensor,
    hessian: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    mask: torch.Tensor,
    iters: int,
    layer_name: str | None,
) -> torch.Tensor:
    """DSF's ``finalize``: A [out, k] refitted on ``mask`` to ``min tr((A·B̂ − T)·H·(A·B̂ − T)ᵀ)``, fp32.

    Raises:
        RuntimeError: naming the layer if the Gram matrix ``B̂·H·B̂ᵀ`` is not positive definite.
    """
    target, live = remove_dead_inputs(target, hessian)
    failures: list[torch.Tensor] = []
    with exact_fp32():
        refitted = refit_left(target[None], live, left[None], right[None], mask[None], iters, failures)[0]
    if any(bool((info != 0).any()) for info in failures):
        raise RuntimeError(f"{layer_prefix(layer_name)}the refit Gram matrix B̂·H·B̂ᵀ is not positive definite")
    return refitted


def quantize_embedding(tensors: Mapping[str, torch.Tensor], name: str | None) -> dict[str, torch.Tensor]:
    """``tensors`` with floating ``tensors[name]`` (an input embedding ``[rows, cols]``) stored as int8 rows
    (docs/format.md "Quantized tensors"): ``Int8Values`` codes by round-to-nearest over every element (no mask),
    inserted under ``name``, followed by ``<name>_scale`` (the fp16 row scales cast to the tensor's dtype).

    A tensor tied to it (the same storage, e.g. ``lm_head.weight``) becomes the same int8 tensor, so it stays tied.
    Other entries, an int8 ``tensors[name]`` (already quantized), and a ``name`` of None are kept as they are.
    """
    from dsf_runtime.quantized import SCALE_SUFFIX

    target = tensors.get(name) if name is not None else None
    if target is None or not target.is_floating_point():
        return dict(tensors)
    rows, cols = target.shape
    quantized = quantize_rtn(target, Int8Values(), mask=torch.ones(rows, cols, dtype=torch.bool, device=target.device),
                             layer_name=name)
    codes, scales = quantized.codes.reshape(rows, cols), quantized.scales.to(target.dtype)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key == name:
            out[key], out[key + SCALE_SUFFIX] = codes, scales
        else:
            out[key] = codes if _same_data(tensor, target) else tensor
    return out


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same elements (tied weights)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())


def quantize_result(result: SolveResult, weight: torch.Tensor, hessian: torch.Tensor, values: str,
                    layer_name: str | None = None, *, group_size: int | None = None,
                    error_feedback: bool = True, small_factor_values: str | None = None) -> SolveResult:
    """``result`` with its factor values quantized to ``values`` (``"int8"``, ``"fp8"`` or ``"int4"``), masks
    kept: by error feedback under ``hessian`` (DSF factors through ``quantize_dsf``: balanced, ``B`` first, ``A``
    refitted and quantized against ``B̂``; a single matrix through ``quantize_gptq``), or with
    ``error_feedback=False`` by round-to-nearest.

    Args:
        group_size: int4 only, columns per scale (default 128).
        small_factor_values: DSF only: the format of the factor with fewer kept values (``quantize_dsf``'s
            ``small_format``); None = ``values``.

    Returns:
        A ``SolveResult`` whose ``factors`` are the decoded values (``code · scale``, exact in fp32), with
        ``values`` (each factor's format name), ``scales`` (fp16, ``[rows]`` per factor, int4
        ``[rows, ceil(cols/g)]``), ``group_size`` (when a factor is int4), ``nnz`` the kept positions and
        ``error`` / ``relative_error`` of the decoded product against ``weight``.

    Raises:
        ValueError: naming the layer for a bad format or group size, or ``small_factor_values`` on a single matrix.
    """
    int4 = "int4" in (values, small_factor_values)
    if group_size is not None and not int4:
        value_format(values, group_size=group_size, layer_name=layer_name)  # raises: group_size is int4's
    fmt = value_format(values, group_size=group_size if values == "int4" else None, layer_name=layer_name)
    small = None if small_factor_values is None else value_format(
        small_factor_values, group_size=group_size if small_factor_values == "int4" else None, layer_name=layer_name)
    if result.kind == "dsf":
        quantized = quantize_dsf(result.factors["A"], result.factors["B"], hessian, fmt, small_format=small,
                                 weight=weight, error_feedback=error_feedback, layer_name=layer_name)
        matrices = {"A": quantized.A, "B": quantized.B}
    elif small is not None:
        raise ValueError(f"{layer_prefix(layer_name)}small_factor_values applies to DSF factors, not one matrix")
    elif error_feedback:
        matrices = {"W": quantize_gptq(result.factors["W"], hessian, fmt, layer_name=layer_name)}
    else:
        matrices = {"W": quantize_rtn(result.factors["W"], fmt, layer_name=layer_name)}
    factors = {k: m.dequantize() for k, m in matrices.items()}
    approx = factors["A"].double() @ factors["B"].double() if result.kind == "dsf" else factors["W"]
    error, relative = layer_error(weight, approx, hessian)
    return replace(
        result, factors=factors, values={k: m.format.name for k, m in matrices.items()},
        scales={k: m.scales if m.format.per_row else m.scales.reshape(m.mask.shape[0], -1)
                for k, m in matrices.items()},
        group_size=(128 if group_size is None else group_size) if int4 else None,
        nnz=sum(int(m.mask.sum()) for m in matrices.values()), error=error, relative_error=relative, masks=None,
    )


@dataclass(frozen=True)
class ValueQuantization:
    """How a compression run quantizes every solved layer's values (``dsf compress --values``).

    Attributes:
        values: ``"int8"``, ``"fp8"`` or ``"int4"``.
        group_size: int4 only, columns per scale (64, 128 or 256; None = 128).
        error_feedback: GPTQ on the mask under the layer's H (True) or round-to-nearest (False).
        small_factor_values: DSF only: the format of each layer's factor with fewer kept values
            (``--small-factor-values``); None = ``values``.
    """

    values: str
    group_size: int | None = None
    error_feedback: bool = True
    small_factor_values: str | None = None

    def __post_init__(self) -> None:
        # raise ValueError for a bad name or group size
        int4 = "int4" in (self.values, self.small_factor_values)
        if self.group_size is not None and not int4:
            value_format(self.values, group_size=self.group_size)
        for name in filter(None, (self.values, self.small_factor_values)):
            value_format(name, group_size=self.group_size if name == "int4" else None)

    def apply(self, result: SolveResult, weight: torch.Tensor, hessian: torch.Tensor,
              layer_name: str | None = None) -> SolveResult:
        """``quantize_result`` with these settings."""
        return quantize_result(result, weight, hessian, self.values, layer_name, group_size=self.group_size,
                               error_feedback=self.error_feedback, small_factor_values=self.small_factor_values)


def codes_of(factor: torch.Tensor, scales: torch.Tensor, values: str, group_size: int | None = None) -> torch.Tensor:
    """The codes ``[rows, cols]`` (int8, float8_e4m3fn, or int4 as int8) of a decoded factor (``code · scale`` in
    fp32, as ``quantize_result`` returns it): ``factor / scale``, exact. ``scales`` is ``[rows]`` (one per row) or,
    with int4's ``group_size``, ``[rows, ceil(cols / group_size)]``."""
    code_dtype = value_format(values, group_size=group_size).code_dtype
    step = scales.float()
    if group_size is not None:
        step = step.repeat_interleave(group_size, dim=1)[:, : factor.shape[1]]
        code_dtype = torch.int8
    else:
        step = step.unsqueeze(1)
    scaled = torch.where(step > 0, factor.float() / step, 0.0)
    return scaled.to(code_dtype) if code_dtype == torch.float8_e4m3fn else scaled.round().to(code_dtype)
