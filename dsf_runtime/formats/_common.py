"""Shared pieces of the packed formats: dtype names, the error type, and vectorized index checks.

Every check here runs on the tensors' own device, reads no element before the bounds that make the read safe
have been verified, and loops over no rows in Python, so hostile input can neither read out of bounds nor hang.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch

__all__ = ["CHUNK_BYTES", "CODE_DTYPES", "INT4", "INT4_GROUP_SIZES", "SCALE_DTYPES", "VALUE_DTYPES", "FormatError",
           "KernelLayoutMixin", "PackedMatrix", "PackedMixin", "dtype_name", "int4_group_count", "pack_int4",
           "unpack_int4"]

# Value dtypes a packed matrix may hold, with the names the manifest uses.
VALUE_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
# Quantized values (docs/format.md "Quantized values"): codes of one byte with one scale per row, value =
# code · scales[row]. The stored layouts (dense, csr, bitmask) and the nibble kernel layout hold them.
CODE_DTYPES: dict[torch.dtype, str] = {
    torch.int8: "int8",
    torch.float8_e4m3fn: "float8_e4m3fn",
}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# int4 codes (docs/format.md "Quantized values"): symmetric codes in [-7, 7], two per byte in storage order (low nibble
# first), with one scale per group of ``group_size`` consecutive columns of a row: scales ``[rows, ceil(cols / g)]``.
INT4 = "int4"
INT4_GROUP_SIZES = (64, 128, 256)
INT4_QMAX = 7
_INDEX_DTYPES: dict[torch.dtype, str] = {torch.int16: "int16", torch.int32: "int32", torch.uint8: "uint8"}
_FIX = "re-export the checkpoint"


class FormatError(ValueError):
    """A packed matrix's tensors are missing, mistyped or inconsistent.

    Attributes:
        tensor: full name of the offending tensor (``"<prefix>.<part>"``), so a caller can add the file it came from.
    """

    def __init__(self, tensor: str, problem: str, fix: str = _FIX) -> None:
        super().__init__(f"'{tensor}' {problem}; {fix}")
        self.tensor = tensor
        self.problem = problem


class PackedMatrix(Protocol):
    """What every layout provides: the stored ones (``DenseMatrix``, ``CSRMatrix``, ``BitmaskMatrix``,
    ``BSRMatrix``) and the GPU kernels' (``NibbleMatrix``, ``DeltaMatrix``), which are stored the same way."""

    layout: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    shape: tuple[int, int]

    @property
    def values(self) -> torch.Tensor: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def nnz(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...
    def dense_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor: ...
    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]: ...
    def validate(self, prefix: str = "") -> None: ...
    def meta(self) -> dict[str, Any]: ...
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedMatrix: ...
    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor: ...
    def kernel_ready(self, device: torch.device) -> bool: ...


def dtype_name(dtype: torch.dtype) -> str:
    """Manifest name of a value or index dtype (``torch.float16`` -> ``"float16"``)."""
    return (VALUE_DTYPES.get(dtype) or CODE_DTYPES.get(dtype) or _INDEX_DTYPES.get(dtype)
            or str(dtype).removeprefix("torch."))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[n]`` in [-8, 7] -> uint8 ``[ceil(n / 2)]``: code ``p`` in nibble ``p & 1`` of byte ``p >> 1``
    (low nibble first, two's complement); an odd ``n`` leaves the last high nibble 0."""
    nibbles = codes.reshape(-1).to(torch.uint8) & 0xF
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Codes ``start:stop`` of a ``pack_int4`` stream, int8 ``[stop - start]`` in [-8, 7]."""
    if stop <= start:
        return torch.empty(0, dtype=torch.int8, device=packed.device)
    pairs = packed[start // 2 : (stop + 1) // 2]
    nibbles = torch.stack([pairs & 0xF, pairs >> 4], dim=1).reshape(-1)[start % 2 : start % 2 + stop - start]
    return (nibbles.to(torch.int8) ^ 8) - 8  # sign-extend the low 4 bits


def int4_group_count(cols: int, group_size: int) -> int:
    """Scales per row of an int4 matrix with ``cols`` columns: ``ceil(cols / group_size)``."""
    return -(-cols // group_size)


def part_name(prefix: str, part: str) -> str:
    """Full tensor name of a part: ``"<prefix>.<part>"``, or ``part`` alone when ``prefix`` is empty."""
    return f"{prefix}.{part}" if prefix else part


def check_matrix(matrix: torch.Tensor, dtype: torch.dtype | None, scales: torch.Tensor | None = None,
                 group_size: int | None = None) -> torch.Tensor:
    """Validate a dense input of ``from_dense`` and return it cast to the value dtype (default: its own). With
    ``scales`` (``[rows]``), ``matrix`` holds codes (``CODE_DTYPES``) and is not cast; with ``group_size`` too,
    ``matrix`` holds int4 codes (int8 in [-7, 7]) and ``scales`` is ``[rows, ceil(cols / group_size)]``."""
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
    if group_size is not None:
        if scales is None:
            raise ValueError("group_size goes with int4 codes and their scales")
        if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
        rows, cols = matrix.shape
        groups = int4_group_count(cols, group_size)
        if matrix.dtype != torch.int8 or dtype not in (None, torch.int8):
            raise TypeError(f"int4 codes are passed as int8, got {dtype_name(matrix.dtype)}")
        if bool(((matrix < -INT4_QMAX) | (matrix > INT4_QMAX)).any()):  # (abs(-128) overflows in int8)
            raise ValueError(f"int4 codes must lie in [-{INT4_QMAX}, {INT4_QMAX}]")
        if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (rows, groups):
            raise ValueError(f"int4 scales must be float [{rows}, {groups}], got {dtype_name(scales.dtype)} "
                             f"{list(scales.shape)}")
        return matrix.detach().contiguous()
    if scales is not None:
        if matrix.dtype not in CODE_DTYPES or dtype not in (None, matrix.dtype):
            raise TypeError(f"scales go with codes of {sorted(CODE_DTYPES.values())}, got {dtype_name(matrix.dtype)}")
        if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (matrix.shape[0],):
            raise ValueError(f"scales must be float [{matrix.shape[0]}], got {dtype_name(scales.dtype)} "
                             f"{list(scales.shape)}")
        return matrix.detach().contiguous()
    target = dtype or matrix.dtype
    if target not in VALUE_DTYPES:
        raise TypeError(f"values must be one of {sorted(VALUE_DTYPES.values())}, got {dtype_name(target)}")
    return matrix.detach().to(target).contiguous()


def check_scales(name: str, values: torch.Tensor, scales: torch.Tensor | None, shape: tuple[int, int],
                 group_size: int | None = None) -> None:
    """Codes (``CODE_DTYPES``) need float ``scales`` ``[rows]``, int4 codes (``group_size`` set) float ``scales``
    ``[rows, ceil(cols / group_size)]``, finite and ≥ 0; float values none. Raises FormatError naming
    ``<prefix>.scales`` (``name``) or, for scales next to float values, the values."""
    rows, cols = shape
    if group_size is not None:
        if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
            raise FormatError(name, f"belongs to int4 codes with group_size {group_size!r}; expected one of "
                                    f"{list(INT4_GROUP_SIZES)}")
        expected, per = (rows, int4_group_count(cols, group_size)), "int4 values need one scale per group"
    elif values.dtype in CODE_DTYPES:
        expected, per = (rows,), f"{dtype_name(values.dtype)} values need one scale per row"
    else:
        if scales is not None:
            raise FormatError(name, f"is stored next to {dtype_name(values.dtype)} values; only "
                                    f"{' or '.join(sorted(CODE_DTYPES.values()))} values have scales")
        return
    if scales is None:
        raise FormatError(name, f"is missing; {per}")
    check_tensor(name, scales, SCALE_DTYPES, expected)
    if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise FormatError(name, "holds a negative, NaN or infinite scale")


def check_int4_values(name: str, values: torch.Tensor, count: int) -> None:
    """Check a ``pack_int4`` stream of ``count`` codes: uint8 ``[ceil(count / 2)]``, no code -8 (outside the
    symmetric range), and a zero padding nibble when ``count`` is odd. Raises FormatError naming ``name``."""
    check_tensor(name, values, (torch.uint8,), ((count + 1) // 2,))
    if not count:
        return
    low, high = values & 0xF, values >> 4
    bad = torch.nonzero((low == 8) | (high == 8))
    if bad.numel():
        byte = int(bad[0, 0])
        raise FormatError(name, f"holds the int4 code -8 in byte {byte}; codes lie in [-{INT4_QMAX}, {INT4_QMAX}]")
    if count % 2 and int(high[-1]):
        raise FormatError(name, f"sets the padding nibble after its {count} codes")


# Upper bound on the temporary that one decompressed row chunk of a weight occupies in ``PackedMixin.matmul``.
CHUNK_BYTES = 64 * 1024 * 1024


class PackedMixin:
    """Methods shared by the layout dataclasses; each subclass names its tensors in ``parts`` and the manifest
    fields its constructor needs besides the tensors in ``options``."""

    parts: ClassVar[tuple[str, ...]]
    options: ClassVar[tuple[str, ...]] = ()
    shape: tuple[int, int]
    values: torch.Tensor
    scales: torch.Tensor | None = None  # scales of quantized values (the stored layouts' dataclass field)
    group_size: int | None = None  # int4 codes: columns per scale (the stored layouts' dataclass field)

    @property
    def stored_parts(self) -> tuple[str, ...]:
        """The parts this matrix stores: ``parts``, plus ``scales`` when its values are codes."""
        return self.parts + ("scales",) if self.scales is not None else self.parts

    @property
    def quantized(self) -> bool:
        """Whether the values are codes with scales (``CODE_DTYPES`` with row scales, or int4 with group scales)."""
        return self.scales is not None

    @property
    def value_format(self) -> str:
        """The manifest's ``dtype``: ``"int4"`` for int4 codes, else the name of the values' dtype."""
        return INT4 if self.group_size is not None else dtype_name(self.dtype)

    def code_options(self) -> dict[str, Any]:
        """``from_dense`` keywords that store this matrix's codes again: ``scales`` (and int4's ``group_size``)."""
        if self.scales is None:
            return {}
        return {"scales": self.scales, **({"group_size": self.group_size} if self.group_size is not None else {})}

    def _stored_values(self, lo: int, hi: int) -> torch.Tensor:
        """Stored values ``lo:hi`` in storage order: the values themselves, or int4 codes unpacked to int8."""
        if self.group_size is not None:
            return unpack_int4(self.values, lo, hi)
        return self.values[lo:hi]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The floating dtype the matrix decodes to by default: the scales' for codes, else the values'."""
        return self.scales.dtype if self.scales is not None else self.values.dtype

    @classmethod
    def from_packed(cls, other: Any, *, dtype: torch.dtype | None = None, **opts: Any):
        """This layout of another layout's matrix (values cast to ``dtype``, default ``other.dtype``), decoded
        through one dense temporary of the matrix on its device. A matrix already in this layout is only cast."""
        if type(other) is cls and not opts:
            return other if dtype in (None, other.dtype) else other.to(dtype=dtype)
        if other.quantized and dtype in (None, other.dtype):  # codes move between layouts unchanged
            return cls.from_dense(other.dense_codes(), **other.code_options(), **opts)
        return cls.from_dense(other.to_dense(), dtype=dtype or other.compute_dtype, **opts)

    def kernel_ready(self, device: torch.device) -> bool:
        """True when the Triton kernels compute with this layout on ``device`` (``dsf_runtime.kernels``); the
        layouts stored for the CPU say False and compute with ``matmul``'s pure-torch path."""
        return False

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``y = x·Wᵀ`` in pure torch, never holding more than ``CHUNK_BYTES`` of decompressed rows.

        Args:
            x: ``[..., cols]`` float16/bfloat16/float32 on the matrix's device.
            out_dtype: dtype of ``y`` (default ``x.dtype``). Computes in fp32 on the CPU and whenever fp32 is in
                or out, else in ``x.dtype``.

        Returns:
            ``[..., rows]`` in ``out_dtype``.
        """
        out_dtype = out_dtype or x.dtype
        rows, cols = self.shape
        if x.shape[-1] != cols:
            raise ValueError(f"input has {x.shape[-1]} features, the {rows}x{cols} weight expects {cols}")
        compute = torch.float32 if x.device.type == "cpu" or torch.float32 in (x.dtype, out_dtype) else x.dtype
        x2 = x.reshape(-1, cols).to(compute)
        step = self._row_step(max(1, CHUNK_BYTES // (4 * max(cols, 1))))
        if step >= rows:
            y = x2 @ self.to_dense(compute).T
        else:
            y = torch.empty(x2.shape[0], rows, dtype=compute, device=x.device)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                y[:, start:stop] = x2 @ self.dense_rows(start, stop, compute).T
        return y.to(out_dtype).reshape(*x.shape[:-1], rows)

    def meta(self) -> dict[str, Any]:
        """The manifest's per-factor entry: the common fields, then the layout's own (``_meta_fields``), then
        ``scale_dtype`` for quantized values."""
        scale = {"scale_dtype": dtype_name(self.scales.dtype)} if self.scales is not None else {}
        group = {"group_size": self.group_size} if self.group_size is not None else {}
        return {"shape": list(self.shape), "layout": self.layout, "dtype": self.value_format, "nnz": self.nnz,
                "index_dtype": None, "block_size": None, "bit_order": None, **self._meta_fields(), **scale, **group}

    def dense_codes(self) -> torch.Tensor:
        """The codes as a dense ``[rows, cols]`` matrix in the codes' dtype (int8 for int4), zero where nothing
        is stored (a quantized matrix only)."""
        if self.scales is None:
            raise TypeError(f"a {dtype_name(self.dtype)} {self.layout} matrix has no codes")
        code_dtype = torch.int8 if self.group_size is not None else self.dtype
        return self._scatter_rows(0, self.shape[0], torch.float32).to(code_dtype)

    def _meta_fields(self) -> dict[str, Any]:
        """Manifest fields of this layout besides the common ones (``meta``)."""
        return {}

    def _row_step(self, step: int) -> int:
        """Rows per decompressed chunk of ``matmul``, rounded to what ``dense_rows`` reads whole."""
        return step

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored values."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Storage bytes of all tensors (what the file holds, without headers)."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The matrix, ``[rows, cols]`` in ``dtype`` (default: ``compute_dtype``); codes times their scales."""
        return self.dense_rows(0, self.shape[0], dtype)

    def dense_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a dense ``[stop - start, cols]`` tensor in ``dtype`` (default:
        ``compute_dtype``); quantized values are decoded in fp32 (code · its row or group scale), then cast."""
        dtype = dtype or self.compute_dtype
        if self.scales is None:
            return self._scatter_rows(start, stop, dtype)
        scales = self.scales[start:stop].float()
        if self.group_size is not None:  # [rows, groups] -> one scale per column
            scales = scales.repeat_interleave(self.group_size, dim=1)[:, : self.shape[1]]
        else:
            scales = scales.unsqueeze(1)
        return (self._scatter_rows(start, stop, torch.float32) * scales).to(dtype)

    def _scatter_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the stored values (codes as numbers, no scales) as a dense tensor in ``dtype``."""
        raise NotImplementedError

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors to store, named ``"<prefix>.<part>"``."""
        return {part_name(prefix, p): getattr(self, p) for p in self.stored_parts}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device`` with values cast to ``dtype`` (indices keep their dtype). Quantized values cast to
        a float ``dtype`` are decoded (code · scale) and the matrix is packed again without scales."""
        moved = {p: getattr(self, p).to(device) for p in self.stored_parts}
        if dtype is not None:
            if dtype not in VALUE_DTYPES:
                raise TypeError(f"values must be one of {sorted(VALUE_DTYPES.values())}, got {dtype_name(dtype)}")
            if self.scales is not None:
                layout_options = {k: getattr(self, k) for k in self.options if k != "group_size"}
                return type(self).from_dense(dataclasses.replace(self, **moved).to_dense(dtype), dtype=dtype,
                                             **layout_options)
            moved["values"] = moved["values"].to(dtype)
        return dataclasses.replace(self, **moved)

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, shape: tuple[int, int], *, validate: bool = True,
        **options: Any,
    ):
        """Rebuild from the tensors ``<prefix>.<part>`` (one per name in ``parts``) of a matrix of ``shape`` and the
        layout's ``options`` (manifest fields).

        Raises:
            FormatError: a part is missing, or (with ``validate``) ``validate(prefix)`` fails.
        """
        packed = cls(**cls._take_parts(tensors, prefix), shape=(int(shape[0]), int(shape[1])), **options)
        if validate:
            packed.validate(prefix)
        return packed

    @classmethod
    def _take_parts(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        missing = [part_name(prefix, p) for p in cls.parts if part_name(prefix, p) not in tensors]
        if missing:
            raise FormatError(missing[0], "is missing", "re-export the checkpoint (it must hold every part)")
        taken = {p: tensors[part_name(prefix, p)] for p in cls.parts}
        if part_name(prefix, "scales") in tensors:
            taken["scales"] = tensors[part_name(prefix, "scales")]
        return taken


class KernelLayoutMixin(PackedMixin):
    """The layouts the GPU kernels compute on (``nibble``, ``delta``): ``matmul`` runs the Triton kernels where they
    run (``kernel_ready``), else the pure-torch path."""

    def kernel_ready(self, device: torch.device) -> bool:
        from dsf_runtime.kernels import unavailable_reason

        return unavailable_reason(device) is None

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``y = x·Wᵀ`` (``PackedMixin.matmul``), on the Triton kernels where they run."""
        if self.kernel_ready(x.device):
            from dsf_runtime.kernels.dispatch import linear

            return linear(x, [self], None, out_dtype)
        return super().matmul(x, out_dtype)


def check_tensor(
    name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int | None, ...]
) -> None:
    """Raise FormatError unless ``tensor`` has one of ``dtypes`` and ``shape`` (``None`` matches any extent)."""
    if not isinstance(tensor, torch.Tensor):
        raise FormatError(name, f"is a {type(tensor).__name__}, expected a tensor")
    if tensor.dtype not in dtypes:
        expected = " or ".join(dtype_name(d) for d in dtypes)
        raise FormatError(name, f"is {dtype_name(tensor.dtype)}, expected {expected}")
    found = tuple(tensor.shape)
    if len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise FormatError(name, f"has shape {list(found)}, expected {want}")


def check_row_ptr(name: str, row_ptr: torch.Tensor, n_rows: int, nnz: int) -> None:
    """Check an int32 ``[n_rows + 1]`` offset array: starts at 0, non-decreasing, ends at ``nnz``."""
    check_tensor(name, row_ptr, (torch.int32,), (n_rows + 1,))
    first, last = int(row_ptr[0]), int(row_ptr[-1])
    if first != 0:
        raise FormatError(name, f"starts at {first}, expected 0")
    if n_rows:
        drops = torch.nonzero(row_ptr[1:] < row_ptr[:-1])
        if drops.numel():
            i = int(drops[0, 0])
            raise FormatError(name, f"decreases at row {i} ({int(row_ptr[i])} -> {int(row_ptr[i + 1])})")
    if last != nnz:
        raise FormatError(name, f"ends at {last}, expected {nnz} (the number of stored values)")


def row_ids(row_ptr: torch.Tensor, start: int, stop: int, total: int) -> torch.Tensor:
    """Local row (``0 .. stop-start-1``) of each of the ``total`` entries owned by rows ``start:stop``; int64."""
    counts = (row_ptr[start + 1 : stop + 1] - row_ptr[start:stop]).long()
    rows = torch.arange(stop - start, device=row_ptr.device)
    return torch.repeat_interleave(rows, counts, output_size=total)


def check_indices(name: str, idx: torch.Tensor, row_ptr: torch.Tensor, bound: int, what: str) -> None:
    """Check that ``idx`` (row_ptr already valid) lies in ``[0, bound)`` and strictly ascends within each row."""
    n = idx.numel()
    if n == 0:
        return
    idx64 = idx.long()
    bad = torch.nonzero((idx64 < 0) | (idx64 >= bound))
    if bad.numel():
        p = int(bad[0, 0])
        raise FormatError(
            name, f"holds {what} {int(idx64[p])} at position {p} (row {_row_of(row_ptr, p)}), outside [0, {bound})"
        )
    starts = row_ptr[1:-1].long()
    new_row = torch.zeros(n, dtype=torch.bool, device=idx.device)
    new_row[starts[starts < n]] = True
    bad = torch.nonzero((idx64[1:] <= idx64[:-1]) & ~new_row[1:])
    if bad.numel():
        p = int(bad[0, 0]) + 1
        raise FormatError(
            name,
            f"is not strictly ascending within row {_row_of(row_ptr, p)} "
            f"(position {p}: {int(idx64[p])} after {int(idx64[p - 1])})",
        )


def _row_of(row_ptr: torch.Tensor, position: int) -> int:
    """Row that owns stored entry ``position`` (row_ptr already valid)."""
    probe = torch.tensor([position], dtype=row_ptr.dtype, device=row_ptr.device)
    return int(torch.searchsorted(row_ptr, probe, right=True)[0]) - 1


def nonzero_entries(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zeros of a 2-D tensor in row-major order (NaN counts as non-zero, ``-0.0`` as zero).

    Returns:
        ``(mask [rows, cols] bool, positions [nnz] int64 = row * cols + col, values [nnz])``.
    """
    mask = dense != 0
    positions = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return mask, positions, dense.reshape(-1)[positions]


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """int32 ``[n + 1]`` exclusive prefix sums of per-row counts ``[n]``: ``0, c0, c0 + c1, ...``."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def count_nonzero(values: torch.Tensor) -> int:
    """Number of non-zero elements (NaN counts as non-zero; any value dtype, float8 codes included)."""
    return int((values != 0).sum())
