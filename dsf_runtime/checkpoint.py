"""The compressed model directory, format version 1 (docs/format.md): write it atomically, open and validate it.

Writing (what ``dsf compress`` does with its fp32 factors)::

    layers = {
        fqn: CompressedLayer.from_dense("dsf", {"A": A, "B": B}, method="dsf", error=err, relative_error=rel)
        for fqn, (A, B, err, rel) in solved.items()
    }
    tensors = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in layers}
    save_compressed(out_dir, tensors=tensors, layers=layers, config_source=model_dir,
                    info={"base_model": "smollm2-135m", "compression": config_dict})

Reading: ``ckpt = open_compressed(dir)`` checks the manifest, every file's version and the tensor names;
``ckpt.load_layer(fqn, device)`` and ``ckpt.load_tensors(device)`` then read straight to the device and validate.

Only generic entries are known here: the linear kinds (``dsf``, ``single``) are checked fully, any other kind
(the convolutions of docs/format.md, "Convolution layers") only generically (factors, shapes, bias), and it loads
as a ``CompressedLayer`` whose ``extra`` holds the entry's kind-specific fields. The reader of such a kind checks
the rest and builds its own layer (``dsf_runtime.conv.open_conv_checkpoint``, ``load_conv_layer``), reporting
through ``CompressedCheckpoint.layer_error``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsf_runtime.formats import AUTO_LAYOUTS as _CODE_LAYOUTS
from dsf_runtime.formats import (
    CODE_DTYPES,
    INT4,
    INT4_GROUP_SIZES,
    LAYOUTS,
    VALUE_DTYPES,
    FormatError,
    dtype_name,
    from_meta,
)
from dsf_runtime.layer import CompressedLayer, factor_problem
from dsf_runtime.quantized import FORMAT as INT8_ROW, SCALE_SUFFIX, check_quantized, dequantize_rows

_CODE_NAMES = (*CODE_DTYPES.values(), INT4)  # manifest dtypes of quantized values (they come with scales)
# Layouts that store codes: the stored layouts, and the nibble kernel layout (its decode kernel reads them; a
# CUDA-loaded model saves it so).
_LAYOUT_CODES = {layout: _CODE_NAMES for layout in (*_CODE_LAYOUTS, "nibble")}

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "QUANT_METHOD",
    "SINGLE_FILE",
    "CheckpointError",
    "CompressedCheckpoint",
    "CompressedLayer",
    "open_compressed",
    "quantization_config",
    "read_json",
    "save_compressed",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "dsf-compressed"
FORMAT_VERSION = 1
MANIFEST_NAME = "dsf_manifest.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
FILE_METADATA = {"format": "pt", "dsf_format": FORMAT_NAME, "dsf_format_version": str(FORMAT_VERSION)}
PRODUCER = "dsf-toolkit 0.1.0"
QUANT_METHOD = "dsf"  # config.json's quantization_config.quant_method
# Files copied from the base model's directory besides config.json.
_COPIED = re.compile(r"generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*"
                     r"|merges\.txt|chat_template\..*|spiece\.model")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_INFO_KEYS = ("base_model", "architecture", "compression")
_FIX = "re-export the checkpoint"
# The manifest fields every layer entry has; the others are the entry's kind-specific ``extra``.
_GENERIC_FIELDS = ("kind", "method", "shape", "inner_dim", "nnz", "density", "bias", "error", "relative_error",
                   "factors")
# Limits on what a reader parses before it trusts a file (docs/format.md, "Readers must check").
MAX_JSON_BYTES = 64 * 1024**2
MAX_JSON_DEPTH = 64
MAX_HEADER_BYTES = 64 * 1024**2
MAX_HEADER_TENSORS = 100_000
_DENSITY_RTOL = 1e-6
_MAX_NNZ = 2**53  # counts stay exact as floats (density = nnz / (out * in))


class CheckpointError(ValueError):
    """A compressed directory is incomplete, of an unknown version, or holds a tensor that fails validation.
    The message names the file and, where one is at fault, the tensor."""


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether parsed JSON ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _parse_json(path: Path, data: bytes, fix: str = _FIX) -> Any:
    """Parse JSON ``data`` read from ``path``, refusing nesting deeper than ``MAX_JSON_DEPTH``.

    Raises:
        CheckpointError: naming ``path`` when ``data`` is not UTF-8 JSON or nests too deep.
    """
    try:
        value = json.loads(data.decode("utf-8"))
        too_deep = _json_depth_exceeds(value, MAX_JSON_DEPTH)
    except RecursionError:
        too_deep = True
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if too_deep:
        raise CheckpointError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; {fix}")
    return value


def read_json(path: str | os.PathLike[str], max_bytes: int | None = None, fix: str = _FIX) -> Any:
    """Read and parse a JSON file of the directory (manifest, index, ``config.json``) within ``max_bytes``
    (default ``MAX_JSON_BYTES``) and ``MAX_JSON_DEPTH``; ``fix`` ends the error messages.

    Raises:
        CheckpointError: naming ``path`` when it cannot be read, is too large, not JSON or nested too deep.
    """
    path, max_bytes = Path(path), max_bytes or MAX_JSON_BYTES
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size} bytes, more than the {max_bytes} a reader accepts; {fix}")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc}); {fix}") from exc
    return _parse_json(path, data, fix)


def _is_int(value: Any) -> bool:
    """An integer and not a bool (JSON ``true`` parses as ``True == 1``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A finite int or float and not a bool."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _count_problem(entry: dict[str, Any]) -> str | None:
    """Why a layer entry's ``nnz``, ``density``, ``error`` or ``relative_error`` disagree with its factors, or None.
    ``entry`` has passed the shape and factor checks of ``_check_entry``."""
    nnz = entry.get("nnz")
    total = sum(meta["nnz"] for meta in entry["factors"].values())
    if not _is_int(nnz) or not 0 <= nnz <= _MAX_NNZ:
        return f"has nnz {nnz!r}, expected an integer in [0, 2**53]"
    if nnz != total:
        return f"has nnz {nnz}, but its factors hold {total}"
    out, inp = entry["shape"]
    density = entry.get("density")
    expected = nnz / (out * inp) if out * inp else 0.0
    if not _is_finite_number(density) or not 0 <= density <= 1:
        return f"has density {density!r}, expected a number in [0, 1]"
    if not math.isclose(density, expected, rel_tol=_DENSITY_RTOL, abs_tol=1e-12):
        return f"has density {density!r}, but nnz / (out * in) = {expected!r}"
    for key in ("error", "relative_error"):
        if entry.get(key) is not None and not _is_finite_number(entry[key]):
            return f"has {key} {entry[key]!r}, expected a finite number or null"
    return None


def _part_names(fqn: str, entry: Mapping[str, Any]) -> list[str]:
    """Tensor names the manifest entry of layer ``fqn`` requires, factors in order, then the bias."""
    names = [f"{fqn}.{k}.{p}" for k, f in entry["factors"].items()
             for p in LAYOUTS[f["layout"]].parts + (("scales",) if f["dtype"] in _CODE_NAMES else ())]
    return names + ([f"{fqn}.bias"] if entry["bias"] else [])


def _check_entry(fqn: str, entry: Any) -> str | None:
    """Why a manifest layer entry is malformed, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("factors"), dict):
        return "is not an object with 'factors'"
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s >= 0 for s in shape)):
        return f"has shape {shape!r}, expected [out, in]"
    for key, meta in entry["factors"].items():
        if not isinstance(meta, dict):
            return f"factor {key!r} is not an object"
        if not isinstance(meta.get("layout"), str) or meta["layout"] not in LAYOUTS:
            return f"factor {key!r} has layout {meta.get('layout')!r}, expected one of {sorted(LAYOUTS)}"
        if meta.get("dtype") in _CODE_NAMES:
            if meta["dtype"] not in _LAYOUT_CODES.get(meta["layout"], ()):
                holders = [layout for layout, codes in _LAYOUT_CODES.items() if meta["dtype"] in codes]
                return (f"factor {key!r} holds {meta['dtype']} codes in layout {meta['layout']!r}; only "
                        f"{holders} store them")
            if meta.get("scale_dtype") not in VALUE_DTYPES.values():
                return (f"factor {key!r} has scale_dtype {meta.get('scale_dtype')!r}, expected one of "
                        f"{sorted(VALUE_DTYPES.values())} for its {meta['dtype']} codes")
        elif meta.get("dtype") not in VALUE_DTYPES.values():
            expected = sorted([*VALUE_DTYPES.values(), *_CODE_NAMES])
            return f"factor {key!r} has dtype {meta.get('dtype')!r}, expected one of {expected}"
        if (meta.get("dtype") == INT4) != ("group_size" in meta) or (
                "group_size" in meta and (not _is_int(meta["group_size"]) or meta["group_size"] not in INT4_GROUP_SIZES)):
            return (f"factor {key!r} has dtype {meta.get('dtype')!r} and group_size {meta.get('group_size')!r}; int4 "
                    f"codes need a group_size of {list(INT4_GROUP_SIZES)}, other values none")
        fshape = meta.get("shape")
        if not (isinstance(fshape, list) and len(fshape) == 2 and all(_is_int(s) and s >= 0 for s in fshape)):
            return f"factor {key!r} has shape {fshape!r}, expected [rows, cols]"
        if not _is_int(meta.get("nnz")) or not 0 <= meta["nnz"] <= _MAX_NNZ:
            return f"factor {key!r} has nnz {meta.get('nnz')!r}, expected an integer in [0, 2**53]"
    if not isinstance(entry.get("bias"), bool):
        return f"has bias {entry.get('bias')!r}, expected true or false"
    factor_shapes = {k: tuple(m["shape"]) for k, m in entry["factors"].items()}
    return (factor_problem(entry.get("kind"), tuple(shape), factor_shapes, entry.get("inner_dim"))
            or _count_problem(entry))


_FINITE_CHUNK = 1 << 20  # elements checked at a time: isfinite's temporaries stay ~1 MB, not a few times the tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether floating ``tensor`` holds no NaN or Inf; on the CPU checked ``_FINITE_CHUNK`` elements at a time (a
    whole-tensor ``isfinite`` of a 16-bit embedding allocates a few times its size there)."""
    if tensor.itemsize == 1:  # float8 codes: torch has no isfinite for them
        tensor = tensor.view(torch.uint8) & 0x7F
        return not bool((tensor == 0x7F).any())  # e4m3fn's only non-finite encodings are the NaNs S.1111.111
    if tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(_FINITE_CHUNK))


@dataclass
class CompressedCheckpoint:
    """An opened compressed directory (``open_compressed``); tensors are read on demand.

    Each file is mapped once (one ``safe_open`` handle per file and device, kept until ``close()``); use it as a
    context manager (``with open_compressed(d) as ckpt: ...``) to release the mappings at the end of a load.

    Attributes:
        directory: the directory.
        manifest: the parsed ``dsf_manifest.json``.
        layers: the manifest's layer entries, keyed by module name.
        weight_map: file name (in ``directory``) of every tensor.
        allow_nonfinite: accept NaN/Inf values in factors, biases and floating tensors (else a CheckpointError).
    """

    directory: Path
    manifest: dict[str, Any]
    weight_map: dict[str, str]
    allow_nonfinite: bool = False
    layers: dict[str, dict[str, Any]] = field(init=False)
    _handles: dict[tuple[str, str], Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = self.manifest["layers"]

    def __enter__(self) -> CompressedCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every file mapping; a later ``read`` maps the file again."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def _handle(self, file: str, device: str) -> Any:
        """The ``safe_open`` handle of ``file`` for ``device``, opened on first use."""
        if (file, device) not in self._handles:
            self._handles[(file, device)] = safe_open(self.directory / file, framework="pt", device=device)
        return self._handles[(file, device)]

    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """Raise a CheckpointError naming the file and ``name`` when floating ``tensor`` holds NaN or Inf (unless
        ``allow_nonfinite``)."""
        if self.allow_nonfinite or not tensor.is_floating_point() or all_finite(tensor):
            return
        raise CheckpointError(
            f"{self.file_of(name)}: '{name}' holds NaN or Inf values; {_FIX} from finite weights, or pass "
            "allow_nonfinite=True to load it anyway"
        )

    @property
    def quantized(self) -> dict[str, str]:
        """The uncompressed tensors stored quantized (the manifest's ``quantized_tensors``): name -> encoding
        (``"int8-row"``: the int8 tensor plus ``<name>_scale``, docs/format.md "Quantized tensors")."""
        return dict(self.manifest.get("quantized_tensors") or {})

    def tensor_dtype(self, name: str) -> torch.dtype:
        """The torch dtype tensor ``name`` is stored in (from the file header)."""
        return _TORCH_DTYPES[self._tensor_info[name][0]]

    @property
    def uncompressed_names(self) -> list[str]:
        """Names of the tensors that are not part of a compressed layer, in file order."""
        owned = {n for fqn, entry in self.layers.items() for n in _part_names(fqn, entry)}
        return [n for n in self.weight_map if n not in owned]

    def layer_error(self, fqn: str, problem: str) -> CheckpointError:
        """The error for a malformed manifest entry: ``"<manifest>: layer '<fqn>' <problem>; re-export ..."``."""
        return CheckpointError(f"{self.directory / MANIFEST_NAME}: layer '{fqn}' {problem}; {_FIX}")

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name`` (or should: the single file, else the index)."""
        if name in self.weight_map:
            return self.directory / self.weight_map[name]
        return self.directory / (INDEX_NAME if (self.directory / INDEX_NAME).is_file() else SINGLE_FILE)

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors straight to ``device`` (``safe_open(..., device=...)``)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            path = self.directory / file
            try:
                handle = self._handle(file, str(device))
                for name in file_names:
                    out[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(
                    f"{path}: cannot read tensor data ({exc}); the file is corrupted, {_FIX}"
                ) from exc
        return out

    def load_layer(self, fqn: str, device: torch.device | str = "cpu", *, validate: bool = True) -> CompressedLayer:
        """Read and validate compressed layer ``fqn`` on ``device``: a ``CompressedLayer`` of the entry's kind, its
        kind-specific manifest fields (e.g. ``conv``) in ``extra``.

        Raises:
            CheckpointError: naming the file and tensor when a dtype, shape or index is wrong, or a tensor
                disagrees with the manifest.
        """
        if fqn not in self.layers:
            raise KeyError(f"{self.directory / MANIFEST_NAME}: no compressed layer {fqn!r}")
        entry = self.layers[fqn]
        tensors = self.read(_part_names(fqn, entry), device)
        factors = {}
        for key, meta in entry["factors"].items():
            try:
                factors[key] = from_meta(tensors, f"{fqn}.{key}", meta, validate=validate)
            except FormatError as exc:
                raise CheckpointError(f"{self.file_of(exc.tensor)}: {exc}") from exc
            self.check_finite(f"{fqn}.{key}.values", factors[key].values)
        bias = tensors.get(f"{fqn}.bias")
        if bias is not None and (bias.dtype not in VALUE_DTYPES or tuple(bias.shape) != (entry["shape"][0],)):
            raise CheckpointError(
                f"{self.file_of(fqn + '.bias')}: '{fqn}.bias' is {dtype_name(bias.dtype)} {list(bias.shape)}, "
                f"expected a float [{entry['shape'][0]}]; {_FIX}"
            )
        if bias is not None:
            self.check_finite(f"{fqn}.bias", bias)
        return CompressedLayer(
            entry["kind"], tuple(entry["shape"]), factors, entry.get("method", "unknown"), bias,
            entry.get("error"), entry.get("relative_error"), entry.get("inner_dim"),
            {k: v for k, v in entry.items() if k not in _GENERIC_FIELDS},
        )

    def layer_skeleton(self, fqn: str) -> CompressedLayer:
        """Compressed layer ``fqn`` with ``meta`` tensors of the stored shapes and dtypes (from the file headers, no
        data read), for a loader that fills the tensors itself (transformers, ``dsf_runtime.hf``).

        Raises:
            CheckpointError: a tensor's dtype has no torch equivalent, or its header disagrees with the manifest.
        """
        entry = self.layers[fqn]
        tensors = {}
        for name in _part_names(fqn, entry):
            dtype, shape = self._tensor_info[name]
            if dtype not in _TORCH_DTYPES:
                raise CheckpointError(f"{self.file_of(name)}: '{name}' has dtype {dtype}; {_FIX}")
            tensors[name] = torch.empty(shape, dtype=_TORCH_DTYPES[dtype], device="meta")
        factors = {}
        for key, meta in entry["factors"].items():
            try:
                factors[key] = from_meta(tensors, f"{fqn}.{key}", meta, validate=False)
            except FormatError as exc:
                raise CheckpointError(f"{self.file_of(exc.tensor)}: {exc}") from exc
        return CompressedLayer(
            entry["kind"], tuple(entry["shape"]), factors, entry.get("method", "unknown"), tensors.get(f"{fqn}.bias"),
            entry.get("error"), entry.get("relative_error"), entry.get("inner_dim"),
            {k: v for k, v in entry.items() if k not in _GENERIC_FIELDS},
        )

    def load_tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *, dequantize: bool = False
    ) -> dict[str, torch.Tensor]:
        """The uncompressed tensors on ``device``; floating ones cast to ``dtype`` when given. Quantized tensors
        (``quantized``) come as stored (int8 plus ``<name>_scale``), or with ``dequantize`` as one floating tensor
        in the scale's dtype.

        Raises:
            CheckpointError: a tensor cannot be read, holds NaN/Inf (unless ``allow_nonfinite``), or a scale is
                negative.
        """
        tensors = self.read(self.uncompressed_names, device)
        for name, tensor in tensors.items():
            self.check_finite(name, tensor)
        for name in self.quantized:
            scale = tensors[name + SCALE_SUFFIX]
            if bool((scale < 0).any()):
                raise CheckpointError(f"{self.file_of(name + SCALE_SUFFIX)}: '{name}{SCALE_SUFFIX}' holds negative "
                                      f"scales; {_FIX}")
            if dequantize:
                tensors[name] = dequantize_rows(tensors[name], tensors.pop(name + SCALE_SUFFIX))
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        return tensors

    def records(self) -> list[dict[str, Any]]:
        """One record per compressed layer for ``dsf inspect``: name, kind, method, layouts, shape, inner_dim,
        nnz, density, bytes (factors + bias as stored), dense_fp16_bytes, error, relative_error."""
        sizes = self.tensor_bytes()
        rows = []
        for fqn, entry in self.layers.items():
            out, inp = entry["shape"]
            rows.append({
                "name": fqn,
                "kind": entry["kind"],
                "method": entry.get("method"),
                "layouts": "/".join(f["layout"] for f in entry["factors"].values()),
                "dtype": "/".join(sorted({f["dtype"] for f in entry["factors"].values()})),
                "shape": (out, inp),
                "inner_dim": entry.get("inner_dim"),
                "nnz": entry.get("nnz"),
                "density": entry.get("density"),
                "bytes": sum(sizes[n] for n in _part_names(fqn, entry)),
                "dense_fp16_bytes": 2 * out * inp + (2 * out if entry.get("bias") else 0),
                "error": entry.get("error"),
                "relative_error": entry.get("relative_error"),
            })
        return rows

    def tensor_bytes(self) -> dict[str, int]:
        """Stored bytes of every tensor, from the file headers (no data is read)."""
        return {name: numel * _ITEM_BYTES[dtype] for name, (dtype, numel) in self._header().items()}

    def size_summary(self) -> dict[str, int | float]:
        """Stored bytes against the same model dense in fp16, from the file headers (no data is read).

        Returns:
            ``linear_bytes`` (compressed layers: factors and biases), ``linear_dense_fp16_bytes`` (their weights
            and biases dense in fp16), ``other_bytes`` (every other tensor as stored), ``other_fp16_bytes`` (the
            same with floating and quantized tensors at 2 bytes per element, without the scales), ``total_bytes``, ``dense_fp16_bytes`` and
            ``ratio`` = ``total_bytes / dense_fp16_bytes``; ``linear_ratio`` likewise for the compressed layers.
        """
        header = self._header()
        owned = {n for fqn, entry in self.layers.items() for n in _part_names(fqn, entry)}
        linear = sum(header[n][1] * _ITEM_BYTES[header[n][0]] for n in owned)
        linear_fp16 = sum(2 * e["shape"][0] * e["shape"][1] + (2 * e["shape"][0] if e.get("bias") else 0)
                          for e in self.layers.values())
        others = {n: v for n, v in header.items() if n not in owned}
        other = sum(numel * _ITEM_BYTES[dtype] for dtype, numel in others.values())
        scales = {name + SCALE_SUFFIX for name in self.quantized}
        other_fp16 = sum(
            0 if n in scales else numel * (2 if dtype.startswith(("F", "BF")) or n in self.quantized else _ITEM_BYTES[dtype])
            for n, (dtype, numel) in others.items()
        )
        return {
            "linear_bytes": linear, "linear_dense_fp16_bytes": linear_fp16,
            "linear_ratio": linear / linear_fp16 if linear_fp16 else 1.0,
            "other_bytes": other, "other_fp16_bytes": other_fp16,
            "total_bytes": linear + other, "dense_fp16_bytes": linear_fp16 + other_fp16,
            "ratio": (linear + other) / (linear_fp16 + other_fp16) if linear_fp16 + other_fp16 else 1.0,
        }

    def _header(self) -> dict[str, tuple[str, int]]:
        """``name -> (safetensors dtype, element count)`` of every tensor, from the file headers."""
        return {name: (dtype, math.prod(shape)) for name, (dtype, shape) in self._tensor_info.items()}

    @cached_property
    def _tensor_info(self) -> dict[str, tuple[str, list[int]]]:
        """``name -> (safetensors dtype, shape)`` of every tensor, read once from the file headers."""
        info = {}
        for file in dict.fromkeys(self.weight_map.values()):
            handle = self._handle(file, "cpu")
            for name in handle.keys():
                part = handle.get_slice(name)
                info[name] = (part.get_dtype(), list(part.get_shape()))
        return info


# torch dtype of the safetensors dtypes a compressed directory may hold.
_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                 "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# Bytes per element of the safetensors dtypes with whole-byte elements.
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
               "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
               "U64": 8, "F64": 8, "C64": 8}


def _is_dense_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds ``config.json`` and safetensors weights, none of them written by dsf."""
    files = sorted(directory.glob("*.safetensors"))
    if not (directory / "config.json").is_file() or not files:
        return False
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                if "dsf_format" in (handle.metadata() or {}):
                    return False
        except (SafetensorError, OSError):
            return False
    return True


def _load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.is_file() and _is_dense_checkpoint(directory):
        raise CheckpointError(
            f"{directory}: a dense Hugging Face checkpoint (config.json and weights, no {MANIFEST_NAME}), not a "
            f"compressed directory; compress it with `dsf compress --model {directory} -o OUT`, or use it as the "
            "dense baseline (`dsf run --model DIR --baseline DENSE_DIR`)"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the directory is incomplete (an interrupted write?) or not a compressed model; "
            "re-run `dsf compress` or `dsf export`"
        )
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format is {found!r}, expected {FORMAT_NAME!r}")
    if not _is_int(manifest.get("format_version")):
        raise CheckpointError(
            f"{path}: format_version is {json.dumps(manifest.get('format_version'))}, expected the integer "
            f"{FORMAT_VERSION}; {_FIX}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version is {manifest.get('format_version')!r}, this reader knows {FORMAT_VERSION}; "
            "upgrade dsf-toolkit or re-export with this version"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{path}: 'layers' is {type(layers).__name__}, expected an object; {_FIX}")
    for fqn, entry in layers.items():
        problem = _check_entry(fqn, entry)
        if problem:
            raise CheckpointError(f"{path}: layer '{fqn}' {problem}; {_FIX}")
    return manifest


def _load_weight_map(directory: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Tensor -> file, from the index or the single file, after checking every file's header and version; and
    the open (CPU) ``safe_open`` handle of every file."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a Hugging Face index with a 'weight_map' ({exc!r}); {_FIX}") from exc
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if bad:
            raise CheckpointError(f"{index}: shard name {bad[0]!r} is not a file name in the directory; {_FIX}")
    else:
        weight_map, files = None, [SINGLE_FILE]
    found: dict[str, str] = {}
    handles: dict[str, Any] = {}
    for file in files:
        keys, handles[file] = _open_file(directory / file)
        for name in keys:
            if name in found:
                raise CheckpointError(f"{directory / file}: tensor '{name}' is also in {found[name]}; {_FIX}")
            found[name] = file
    if weight_map is not None:
        for name, file in weight_map.items():
            if found.get(name) != file:
                raise CheckpointError(f"{directory / file}: tensor '{name}' listed in {INDEX_NAME} is missing; {_FIX}")
        extra = [n for n in found if n not in weight_map]
        if extra:
            raise CheckpointError(f"{directory / found[extra[0]]}: tensor '{extra[0]}' is not in {INDEX_NAME}; {_FIX}")
    return found, handles


def _check_header_limits(path: Path) -> None:
    """Refuse a safetensors header above ``MAX_HEADER_BYTES`` or with more than ``MAX_HEADER_TENSORS`` entries,
    reading the 8-byte length and the JSON header directly, before ``safe_open`` parses it. A header too short or
    malformed to count is left to ``safe_open``'s own message."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: safetensors header of {length} bytes, more than the {MAX_HEADER_BYTES} a reader accepts; "
                f"the file is corrupted or hostile, {_FIX}"
            )
        data = handle.read(length)
    try:
        header = json.loads(data)
    except RecursionError as exc:
        raise CheckpointError(f"{path}: safetensors header nested too deep; {_FIX}") from exc
    except ValueError:
        return
    if isinstance(header, dict) and len(header) > MAX_HEADER_TENSORS + 1:  # + __metadata__
        raise CheckpointError(
            f"{path}: safetensors header lists {len(header)} entries, more than the {MAX_HEADER_TENSORS} tensors a "
            f"reader accepts; the file is corrupted or hostile, {_FIX}"
        )


def _open_file(path: Path) -> tuple[list[str], Any]:
    """Tensor names and the open CPU ``safe_open`` handle of one safetensors file, after checking its header's
    limits and its ``__metadata__`` version."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {_FIX}")
    try:
        _check_header_limits(path)
        handle = safe_open(path, framework="pt", device="cpu")
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupted, {_FIX}"
        ) from exc
    if metadata.get("dsf_format") != FORMAT_NAME or metadata.get("dsf_format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: __metadata__ has dsf_format {metadata.get('dsf_format')!r} version "
            f"{metadata.get('dsf_format_version')!r}, expected {FORMAT_NAME!r} version '{FORMAT_VERSION}'; {_FIX}"
        )
    return keys, handle


def open_compressed(directory: str | os.PathLike[str], *, allow_nonfinite: bool = False) -> CompressedCheckpoint:
    """Open a compressed directory: parse the manifest within the JSON limits and check its schema (every layer's
    shapes, kind, inner_dim, nnz, density and errors against its factors), check every file's header (size and
    tensor count limits) and version, and check that the tensors are exactly those the manifest needs (plus the
    uncompressed ones). Each file stays mapped once until ``close()`` (or the ``with`` block) ends.

    Args:
        directory: the compressed directory.
        allow_nonfinite: let ``load_layer``/``load_tensors`` return NaN/Inf values instead of raising.

    Raises:
        CheckpointError: naming the file (and tensor or layer) at fault.
    """
    directory = Path(directory)
    manifest = _load_manifest(directory)
    weight_map, handles = _load_weight_map(directory)
    ckpt = CompressedCheckpoint(directory, manifest, weight_map, allow_nonfinite)
    ckpt._handles.update({(file, "cpu"): handle for file, handle in handles.items()})
    for fqn, entry in ckpt.layers.items():
        required = _part_names(fqn, entry)
        for name in required:
            if name not in weight_map:
                raise CheckpointError(
                    f"{ckpt.file_of(name)}: tensor '{name}' is missing (the manifest's layer '{fqn}' needs it); {_FIX}"
                )
        allowed = set(required)
        for name in weight_map:
            if name.startswith(fqn + ".") and name not in allowed:
                raise CheckpointError(
                    f"{ckpt.file_of(name)}: unexpected tensor '{name}' (layer '{fqn}' is compressed and stores only "
                    f"{sorted(allowed)}); {_FIX}"
                )
    _check_quantized(ckpt)
    return ckpt


def _check_quantized(ckpt: CompressedCheckpoint) -> None:
    """The manifest's ``quantized_tensors`` agree with the file headers: every entry is an ``int8-row`` pair of
    an uncompressed tensor and its scale, and every other uncompressed tensor is floating or an integer buffer that
    is not int8 (so int8 data never loads as if it were the model's numbers).

    Raises:
        CheckpointError: naming the manifest or the file and tensor.
    """
    listed = ckpt.manifest.get("quantized_tensors") or {}
    path = ckpt.directory / MANIFEST_NAME
    if not isinstance(listed, dict) or any(v != INT8_ROW for v in listed.values()):
        raise CheckpointError(f"{path}: 'quantized_tensors' must map tensor names to {INT8_ROW!r}, got {listed!r}; "
                              f"{_FIX}")
    uncompressed = set(ckpt.uncompressed_names)
    for name in listed:
        for needed in (name, name + SCALE_SUFFIX):
            if needed not in uncompressed:
                raise CheckpointError(f"{ckpt.file_of(needed)}: tensor '{needed}' is missing (the manifest's "
                                      f"quantized_tensors lists '{name}'); {_FIX}")
        info = ckpt._tensor_info
        problem = check_quantized(name, torch.empty(info[name][1], dtype=_TORCH_DTYPES.get(info[name][0], torch.uint8),
                                                    device="meta"),
                                  torch.empty(info[name + SCALE_SUFFIX][1], device="meta",
                                              dtype=_TORCH_DTYPES.get(info[name + SCALE_SUFFIX][0], torch.uint8)))
        if problem:
            raise CheckpointError(f"{ckpt.file_of(name)}: {problem} (an {INT8_ROW} tensor); {_FIX}")
    for name in uncompressed - set(listed):
        if ckpt._tensor_info[name][0] == "I8":
            raise CheckpointError(f"{ckpt.file_of(name)}: '{name}' is int8 but the manifest's quantized_tensors does "
                                  f"not list it (its scale would be lost); {_FIX}")


def save_compressed(
    directory: str | os.PathLike[str],
    *,
    tensors: Mapping[str, torch.Tensor],
    layers: Mapping[str, CompressedLayer],
    config_source: str | os.PathLike[str] | Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a compressed model directory (docs/format.md) atomically: every file goes to a temporary name and is
    renamed into place, the manifest last, so an interrupted write never looks complete.

    Args:
        directory: created if needed; an existing compressed directory is replaced (its manifest is removed first,
            stale shards after the new ones are in place).
        tensors: the uncompressed state-dict tensors (embeddings, norms, uncompressed linears), any device. Tied
            tensors (same storage) are stored once, under the first name. Must not hold ``P.weight``/``P.bias``
            of a compressed layer ``P``: drop them (``{k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in
            layers}``) and pass the bias as ``CompressedLayer.bias``.
        layers: compressed layers keyed by module name; factors in any layout (``CompressedLayer.from_dense``
            builds the compression output's ``dense`` fp32 factors from a solver's result).
        config_source: the base model's directory (``config.json``, ``generation_config.json`` and tokenizer
            files are copied) or a config dict (written as ``config.json``).
        info: manifest fields ``base_model`` (str), ``architecture`` (default: ``config.json``'s first entry of
            ``architectures``) and ``compression`` (the config that produced the factors, JSON-serializable).
        max_shard_bytes: above this many tensor bytes the tensors go to shards plus a Hugging Face index.
        files: more files to write before the manifest (name -> bytes), e.g. ``generation_config.json``.

    Returns:
        ``directory`` as a Path.

    Raises:
        ValueError: listing every problem with the inputs, before anything is written.
    """
    directory = Path(directory)
    units = _collect_tensors(directory, tensors, layers)
    config_files, config = _config_files(config_source)
    config_files.update(files or {})
    manifest = _manifest(layers, info or {}, config, units)
    config_files["config.json"] = _config_json(config, manifest, units)
    shards = _plan_shards(units, max_shard_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    for name, data in config_files.items():
        _atomic(directory / name, lambda tmp, data=data: tmp.write_bytes(data))
    for file, part in shards:
        _atomic(directory / file, lambda tmp, part=part: save_file(part, str(tmp), metadata=FILE_METADATA))
    written = {file for file, _ in shards}
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for _, p in shards for t in p.values())},
            "weight_map": {name: file for file, part in shards for name in part},
        }
        _atomic(directory / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2), encoding="utf-8"))
        written.add(INDEX_NAME)
    for stale in directory.iterdir():
        if stale.name not in written and (stale.name in (SINGLE_FILE, INDEX_NAME) or _SHARD.fullmatch(stale.name)):
            stale.unlink()
    _fsync_dir(directory)
    text = json.dumps(manifest, indent=2)
    _atomic(directory / MANIFEST_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _fsync_dir(directory)
    logger.info("wrote %s (%d layers, %d file(s))", directory, len(layers), len(shards))
    return directory


def _collect_tensors(
    directory: Path, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, CompressedLayer]
) -> list[dict[str, torch.Tensor]]:
    """Validate the inputs and group the tensors to store: one group per uncompressed tensor, one per layer."""
    problems: list[str] = []
    units: list[dict[str, torch.Tensor]] = []
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
            problems.append(f"'{name}' is not a dense tensor with data (got {type(t).__name__}); pass real tensors")
            continue
        if name.rpartition(".")[0] in layers:
            problems.append(
                f"'{name}' belongs to compressed layer '{name.rpartition('.')[0]}'; drop it from `tensors` "
                "(pass a bias as CompressedLayer.bias)"
            )
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            logger.debug("'%s' is tied to '%s'; stored once", name, seen[key])
            continue
        seen[key] = name
        units.append({name: t})
    for name in seen.values():
        if tensors[name].dtype == torch.int8:
            t, scale = tensors[name], tensors.get(name + SCALE_SUFFIX)
            problem = (f"'{name}' is int8 without '{name}{SCALE_SUFFIX}'" if scale is None
                       else check_quantized(name, t, scale))
            if problem:
                problems.append(f"{problem}: an uncompressed int8 tensor is stored as {INT8_ROW} "
                                "(compress.quantize.quantize_embedding makes the pair)")
    for fqn, layer in layers.items():
        if not isinstance(layer, CompressedLayer):
            problems.append(f"layer '{fqn}' is a {type(layer).__name__}, expected a CompressedLayer")
            continue
        unit: dict[str, torch.Tensor] = {}
        for key, factor in layer.factors.items():
            try:
                factor.validate(f"{fqn}.{key}")
            except FormatError as exc:
                problems.append(str(exc))
            unit.update(factor.to_tensors(f"{fqn}.{key}"))
        if layer.bias is not None:
            unit[f"{fqn}.bias"] = layer.bias
        units.append(unit)
    if problems:
        raise ValueError(f"cannot save a compressed model to {directory}:\n  - " + "\n  - ".join(problems))
    return [{k: v.detach().to("cpu").contiguous() for k, v in unit.items()} for unit in units]


def _config_files(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files to copy (name -> bytes) and the parsed config."""
    if isinstance(source, Mapping):
        config = dict(source)
        return {"config.json": json.dumps(config, indent=2).encode()}, config
    source = Path(source)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source}: no config.json; pass the base model's directory or a config dict")
    files = {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file() and _COPIED.fullmatch(p.name)}
    files["config.json"] = (source / "config.json").read_bytes()
    return files, json.loads(files["config.json"])


def quantization_config(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` for ``manifest``: ``quant_method`` ``"dsf"`` (the method
    ``dsf_runtime.hf`` registers with transformers), the format and its version, and the factor layouts and value
    dtypes used."""
    factors = [f for entry in manifest["layers"].values() for f in entry["factors"].values()]
    return {
        "quant_method": QUANT_METHOD,
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "layouts": sorted({f["layout"] for f in factors}),
        "value_dtypes": sorted({f["dtype"] for f in factors}),
    }


def _config_json(config: Mapping[str, Any], manifest: Mapping[str, Any], units: list[dict[str, torch.Tensor]]) -> bytes:
    """``config.json`` for the written directory: the base config plus ``quantization_config``, and ``dtype``
    (``torch_dtype`` too when the config has that older key) set to the uncompressed floating tensors' dtype when
    they share one (else kept), so transformers builds the model in the dtype it is stored in."""
    config = dict(config)
    config["quantization_config"] = quantization_config(manifest)
    owned = {name for fqn, entry in manifest["layers"].items() for name in _part_names(fqn, entry)}
    dtypes = {t.dtype for unit in units for name, t in unit.items() if name not in owned and t.is_floating_point()}
    if len(dtypes) == 1:
        name = dtype_name(dtypes.pop())
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return json.dumps(config, indent=2).encode()


def _manifest(layers: Mapping[str, CompressedLayer], info: Mapping[str, Any], config: Mapping[str, Any],
              units: list[dict[str, torch.Tensor]]) -> dict:
    unknown = sorted(set(info) - set(_INFO_KEYS))
    if unknown:
        raise ValueError(f"info has unknown keys {unknown}; allowed: {list(_INFO_KEYS)}")
    dtypes = {f.meta()["dtype"] for layer in layers.values() for f in layer.factors.values()}
    owned = tuple(f"{fqn}." for fqn in layers)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "producer": PRODUCER,
        "base_model": info.get("base_model"),
        "architecture": info.get("architecture") or (config.get("architectures") or [None])[0],
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "compression": info.get("compression"),
        "quantized_tensors": {name: INT8_ROW for unit in units for name, t in unit.items()
                              if t.dtype == torch.int8 and not name.startswith(owned)},
        "layers": {fqn: layer.meta() for fqn, layer in layers.items()},
    }


def _plan_shards(units: list[dict[str, torch.Tensor]], max_bytes: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """One file if everything fits in ``max_bytes``, else greedy shards (a layer's tensors stay together)."""
    sizes = [sum(t.numel() * t.element_size() for t in unit.values()) for unit in units]
    if sum(sizes) <= max_bytes:
        return [(SINGLE_FILE, {k: v for u in units for k, v in u.items()})]
    groups: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for unit, size in zip(units, sizes):
        if groups[-1] and filled + size > max_bytes:
            groups.append({})
            filled = 0
        groups[-1].update(unit)
        filled += size
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _atomic(path: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary name next to ``path``, flush it to disk, rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
