"""Launch configurations of the decode kernels: tuning files measured per GPU, and a heuristic for the rest.

``lookup(op, rows, per_row, BN)`` returns ``{"BN", "BLOCK_R", "BLOCK_S", "num_warps", "num_stages"}`` (plus the
optional ``PREFETCH``/``XF32``/``CG`` flags) for a matrix with ``rows`` rows and ``per_row`` stored slots per row
(``slots_per_row(matrix)``: ``nibble``: ``S``; ``delta``: average entries), and ``unpack_config(rows, per_row)`` the
tiles of ``nibble_unpack``, and ``tile_config(rows, cols, grid, tokens)`` the ``{"BN", "SPLIT_K", "num_warps",
"num_stages"}`` of ``tile_matmul`` for a ``tile`` matrix and a token count. All read the tables of the current CUDA
device (``torch.cuda.get_device_name()``) from the tuning files, else fall back to ``heuristic`` /
``UNPACK_DEFAULT`` / ``tile_heuristic``.

Tuning files (JSON, written by ``dsf_runtime.kernels.tuning``)::

    {"format": "dsf-kernel-tuning", "version": 1,
     "devices": {"<device name>": {
         "matmul": [{"layout": "nibble", "rows": 4096, "per_row": 1024, "BN": 1, "config": {...}, "us": 9.1}, ...,
                    {"layout": "tile", "rows": 4096, "per_row": 11008, "tokens": 64,
                     "config": {"BN": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}, "us": 40.2}, ...],
         "unpack": [{"rows": 4096, "per_row": 1024, "config": {"block_r": 4, "block_g": 64, "num_warps": 8}}, ...]}}}

A ``tile`` entry is keyed by the matrix's ``rows`` and columns (``per_row``) and a token bucket ``tokens`` (the
next power of two of the token count, ``token_bucket``); its ``config`` holds the kernel's own ``BN``.

Read in order, later entries replacing earlier ones: the files shipped in ``dsf_runtime/kernels/tuned/``, then
the user's file (``use_tuning_file(path)``, else the ``DSF_TUNING_FILE`` environment variable).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DECODE_BN1_MAX_TOKENS", "DECODE_MAX_TOKENS", "TUNED_DIR", "TUNING_ENV", "UNPACK_DEFAULT", "USE_PDL",
           "TuningFileError", "candidates", "device_name", "heuristic", "lookup", "pdl_options", "slots_per_row",
           "read_tuning", "tables", "tile_candidates", "tile_config", "tile_heuristic", "token_bucket",
           "unpack_candidates", "unpack_config", "use_tuning_file"]

# Largest token count for which the streaming (decode) kernels beat decompress + cuBLAS.
DECODE_MAX_TOKENS = 16

# Launch the decode kernels with programmatic dependent launch (Hopper+): each kernel prefetches its first weights
# and waits (griddepcontrol.wait) only before reading its input, so it overlaps the previous kernel's tail.
USE_PDL = True

# Token counts up to which the decode path runs one token per program (BN = 1, weights re-read from L2 per token)
# instead of packing the tokens (BN > 1).
DECODE_BN1_MAX_TOKENS = 2  # measured: BN = 1 wins at 2 tokens on most shapes, loses from 4

UNPACK_DEFAULT = {"block_r": 8, "block_g": 16, "num_warps": 4}

TUNED_DIR = Path(__file__).resolve().parent / "tuned"  # the tuning files shipped with the package
TUNING_ENV = "DSF_TUNING_FILE"
FORMAT = "dsf-kernel-tuning"
VERSION = 1
_MATMUL_KEYS = ("BLOCK_R", "BLOCK_S", "num_warps", "num_stages")
_TILE_KEYS = ("BN", "SPLIT_K", "num_warps", "num_stages")
SMS = 132  # streaming multiprocessors tile_heuristic aims to fill without CUDA (an H100 SXM's); else the device's
_UNPACK_KEYS = ("block_r", "block_g", "num_warps")


class TuningFileError(ValueError):
    """A tuning file that cannot be read; the message names the file and the entry."""


# ---------------------------------------------------------------------------------------------- tuning files
def _int(entry: dict, name: str, where: str) -> int:
    value = entry.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TuningFileError(f"{where}: '{name}' must be a non-negative integer, got {value!r}")
    return value


def _config(entry: dict, required: tuple[str, ...], where: str) -> dict:
    config = entry.get("config")
    if not isinstance(config, dict) or any(k not in config for k in required):
        raise TuningFileError(f"{where}: 'config' must be an object with {list(required)}, got {config!r}")
    return dict(config)


def read_tuning(path: str | Path) -> dict[str, dict[str, dict]]:
    """Parse and check one tuning file.

    Returns:
        ``{device name: {"matmul": {(layout, rows, per_row, BN): config}, "unpack": {(rows, per_row): config}}}``.

    Raises:
        TuningFileError: the file is missing, not JSON, or an entry lacks a field; the message names the file.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TuningFileError(f"{path}: tuning file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TuningFileError(f"{path}: not a readable JSON tuning file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise TuningFileError(f"{path}: not a tuning file (expected an object with \"format\": \"{FORMAT}\", "
                              f"\"version\": {VERSION}); write it with dsf_runtime.kernels.tuning")
    devices = doc.get("devices")
    if not isinstance(devices, dict):
        raise TuningFileError(f"{path}: 'devices' must be an object keyed by device name")
    out: dict[str, dict[str, dict]] = {}
    for name, table in devices.items():
        if not isinstance(table, dict):
            raise TuningFileError(f"{path}: devices[{name!r}] must be an object")
        matmul, unpack = {}, {}
        for i, e in enumerate(table.get("matmul", [])):
            where = f"{path}: devices[{name!r}].matmul[{i}]"
            if not isinstance(e, dict) or e.get("layout") not in ("nibble", "delta", "tile"):
                raise TuningFileError(f"{where}: needs 'layout' 'nibble', 'delta' or 'tile', got {e!r}")
            tile = e["layout"] == "tile"
            key = (e["layout"], _int(e, "rows", where), _int(e, "per_row", where),
                   _int(e, "tokens" if tile else "BN", where))
            matmul[key] = _config(e, _TILE_KEYS if tile else _MATMUL_KEYS, where)
        for i, e in enumerate(table.get("unpack", [])):
            where = f"{path}: devices[{name!r}].unpack[{i}]"
            if not isinstance(e, dict):
                raise TuningFileError(f"{where}: must be an object, got {e!r}")
            unpack[(_int(e, "rows", where), _int(e, "per_row", where))] = _config(e, _UNPACK_KEYS, where)
        out[name] = {"matmul": matmul, "unpack": unpack}
    return out


_user_file: Path | None = None


def use_tuning_file(path: str | Path | None) -> None:
    """Read ``path`` after the shipped tuning files (None: back to ``DSF_TUNING_FILE``), checked now."""
    global _user_file
    if path is not None:
        read_tuning(path)
    _user_file = None if path is None else Path(path)
    tables.cache_clear()


@functools.cache
def tables() -> dict[str, dict[str, dict]]:
    """The merged tables of every tuning file (see the module docstring), read once."""
    files = sorted(TUNED_DIR.glob("*.json"))
    user = _user_file or os.environ.get(TUNING_ENV)
    if user:
        files.append(Path(user))
    merged: dict[str, dict[str, dict]] = {}
    for path in files:
        for name, table in read_tuning(path).items():
            mine = merged.setdefault(name, {"matmul": {}, "unpack": {}})
            mine["matmul"].update(table["matmul"])
            mine["unpack"].update(table["unpack"])
    return merged


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str | None = None) -> str | None:
    """The tuning tables' key of ``device`` (default: the current CUDA device): ``torch.cuda.get_device_name``;
    None for non-CUDA devices or without CUDA."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_name(torch.cuda.current_device() if device.index is None else device.index)


def _table(device: str | None, kind: str) -> dict:
    name = device_name() if device is None else device
    return tables().get(name, {}).get(kind, {}) if name else {}


# ---------------------------------------------------------------------------------------------- lookups
def slots_per_row(matrix: Any) -> int:
    """The tuning key's slots per row of a ``nibble`` (``S``) or ``delta`` (average entries per row) matrix."""
    return matrix.slots if matrix.layout == "nibble" else matrix.slots // max(matrix.shape[0], 1)


def lookup(op: str, rows: int, per_row: int, BN: int, *, device: str | None = None) -> dict:
    """Launch configuration of ``op`` (``"nibble"``/``"delta"``) for this matrix and token block ``BN``.

    The tuned one of ``device`` (a device name; default the current CUDA device) for this key; else the tuned one of
    the nearest measured ``BN`` of the same matrix on the same side of ``BN = 1`` (with ``BN`` replaced); else
    ``heuristic``.
    """
    table = _table(device, "matmul")
    hit = table.get((op, rows, per_row, BN))
    if hit is None:
        near = sorted((abs(k[3].bit_length() - BN.bit_length()), k[3]) for k in table
                      if k[:3] == (op, rows, per_row) and (k[3] == 1) == (BN == 1))
        if near:
            hit = table[(op, rows, per_row, near[0][1])]
    return dict(hit, BN=BN) if hit else dict(heuristic(op, rows, per_row, BN))


def unpack_config(rows: int, per_row: int, *, device: str | None = None) -> dict:
    """Tiles of ``nibble_unpack`` (``block_r``, ``block_g``, ``num_warps``) for a matrix with ``rows`` rows and
    ``per_row`` slots per row: tuned for ``device`` (default the current CUDA device), else ``UNPACK_DEFAULT``."""
    return dict(_table(device, "unpack").get((rows, per_row), UNPACK_DEFAULT))


def token_bucket(tokens: int) -> int:
    """The tuning key of a token count for the ``tile`` kernel: the next power of two (at least 1)."""
    return 1 << max(tokens - 1, 0).bit_length()


def tile_config(rows: int, cols: int, grid: tuple[int, int], tokens: int, *, device: str | None = None) -> dict:
    """``tile_matmul``'s ``{"BN", "SPLIT_K", "num_warps", "num_stages"}`` for a ``rows × cols`` ``tile`` matrix
    whose tile grid is ``grid`` (tile rows, tile columns) and ``tokens`` tokens: the tuned entry of ``device``
    (default the current CUDA device) for this matrix and ``token_bucket(tokens)``, else the one of the nearest tuned
    bucket of the same matrix, else ``tile_heuristic``."""
    table = _table(device, "matmul")
    bucket = token_bucket(tokens)
    hit = table.get(("tile", rows, cols, bucket))
    if hit is None:
        near = sorted((abs(k[3].bit_length() - bucket.bit_length()), k[3]) for k in table
                      if k[:3] == ("tile", rows, cols))
        if near:
            hit = table[("tile", rows, cols, near[0][1])]
    return dict(hit) if hit else tile_heuristic(grid, tokens, _sm_count())


@functools.cache
def _sm_count() -> int:
    """Streaming multiprocessors of the current CUDA device, ``SMS`` without CUDA."""
    if not torch.cuda.is_available():
        return SMS
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def tile_heuristic(grid: tuple[int, int], tokens: int, sms: int = SMS) -> dict:
    """A ``tile_matmul`` configuration without measurements: the smallest ``BN`` in 16/32/64 that holds the tokens
    (64 above), and ``SPLIT_K`` so that tile rows × token blocks × splits reach about two programs per SM (``sms``),
    each split keeping at least 8 tile columns."""
    n_tr, n_tc = grid
    bn = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
    programs = max(n_tr, 1) * -(-max(tokens, 1) // bn)
    split = max(1, min(-(-2 * sms // programs), max(n_tc, 1) // 8))
    return {"BN": bn, "SPLIT_K": split, "num_warps": 4, "num_stages": 2}


def tile_candidates(tokens: int) -> list[dict]:
    """The small set of configurations a sweep times for ``tile_matmul`` at ``tokens`` tokens (``BN`` 16 and, from
    33 tokens, 64; ``SPLIT_K`` 1 and 4)."""
    bns = [bn for bn in (16, 64) if bn == 16 or tokens > 32]
    return [{"BN": bn, "SPLIT_K": sk, "num_warps": 4, "num_stages": 2} for bn in bns for sk in (1, 4)]


def pdl_options(x: torch.Tensor) -> dict:
    """Launch options for programmatic dependent launch (CUDA, ``USE_PDL``): ``GDC`` (the kernels' griddepcontrol
    constexpr) and Triton's ``launch_pdl``; plain ``GDC=False`` elsewhere (the interpreter)."""
    on = bool(USE_PDL and x.is_cuda)
    return {"GDC": True, "launch_pdl": True} if on else {"GDC": False}


def _pow2_floor(v: int) -> int:
    return 1 << max(v, 1).bit_length() - 1


def heuristic(op: str, rows: int, per_row: int, BN: int) -> dict:
    """A reasonable configuration without measurements: enough programs to fill 132 SMs several times,
    ~4-8 KB of weights per program per step, and 3-D gather tiles of at most ~4K elements when ``BN > 1``."""
    block_s = 256 if per_row >= 256 and BN <= 2 else 128
    if BN == 1:
        want = 8
    elif BN <= 4:
        want = 4
    else:
        want = 2
    block_r = max(1, min(want, _pow2_floor(max(rows // 512, 1))))
    if op == "delta":
        block_r = max(1, min(block_r, 4))
    return {"BN": BN, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": 4, "num_stages": 2}


def candidates(op: str, BN: int) -> list[dict]:
    """The small search space a tuning sweep times (``dsf_runtime.kernels.tuning``)."""
    out = []
    if op == "delta":
        shapes = [(4, 256), (4, 512), (8, 256), (2, 512)] if BN == 1 else [(1, 128), (2, 128), (1, 256), (2, 256)]
        for block_r, block_s in shapes:
            for warps in (4, 8) if BN == 1 else (4,):
                out.append({"BN": BN, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": warps, "num_stages": 2})
        return out
    if BN == 1:
        for block_r, block_s, warps in [(2, 512, 4), (4, 512, 8), (8, 256, 4), (8, 256, 8), (16, 256, 4)]:
            for extra in ({}, {"PREFETCH": True}):
                out.append({"BN": 1, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": warps,
                            "num_stages": 2, **extra})
        return out
    shapes = [(2, 128), (4, 128), (2, 256), (4, 256)] if BN <= 4 else [(1, 128), (2, 128), (1, 256), (2, 256)]
    for block_r, block_s in shapes:
        for xf32 in (False, True):
            out.append({"BN": BN, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": 4, "num_stages": 2,
                        "XF32": xf32})
    return out


def unpack_candidates() -> list[dict]:
    """The tiles a tuning sweep times for ``nibble_unpack``."""
    return [{"block_r": r, "block_g": g, "num_warps": w} for r, g, w in
            [(4, 16, 4), (8, 16, 4), (8, 32, 8), (16, 16, 8), (4, 64, 8), (16, 32, 8)]]
