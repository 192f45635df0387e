"""Tuning as data: time the launch configurations of the decode kernels (``configs.candidates``) and of
``nibble_unpack`` (``configs.unpack_candidates``) for given matrices on the current GPU, and write the fastest per
shape into a tuning file that ``configs.lookup`` / ``configs.unpack_config`` read (format: ``configs``' docstring).

Example (CUDA)::

    from dsf_runtime.kernels import tuning
    found = tuning.tune([[A, B], [W]])            # chains of nibble/delta matrices, as dispatch.linear takes them
    tuning.write_tuning("my-gpu.json", found)     # then DSF_TUNING_FILE=my-gpu.json, or configs.use_tuning_file

``tune`` takes a ``timer`` (``fns -> microseconds per call``); the default captures the calls in a CUDA graph
(``timing.graph_time``) with the weights rotated over copies larger than the L2 cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsf_runtime.kernels import configs
from dsf_runtime.kernels.delta_matmul import delta_matmul
from dsf_runtime.kernels.nibble_matmul import nibble_matmul
from dsf_runtime.kernels.nibble_unpack import nibble_unpack
from dsf_runtime.kernels.pack_activations import pack_activations
from dsf_runtime.kernels.timing import graph_time

__all__ = ["Timer", "format_tuning", "graph_timer", "shipped_path", "tune", "weight_copies", "write_tuning"]

Timer = Callable[[Sequence[Callable[[], object]]], float]  # functions (one per weight copy) -> µs per call
_OPS = {"nibble": nibble_matmul, "delta": delta_matmul}
_L2_FALLBACK = 50e6  # bytes, when the device does not report its L2 size


def shipped_path(device: str) -> Path:
    """The tuning file shipped with the package for ``device`` (a GPU name): ``configs.TUNED_DIR/<slug>.json``,
    e.g. ``nvidia-h100-80gb-hbm3.json``."""
    return configs.TUNED_DIR / (re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ".json")


def graph_timer(repeats: int = 5, calls: int = 30) -> Timer:
    """Median µs per call under CUDA-graph replay (``timing.graph_time``)."""
    return lambda fns: graph_time(fns, calls=calls, repeats=repeats)["us"]


def weight_copies(matrix: Any, copies: int | None = None) -> list[Any]:
    """``matrix`` and clones of it (its tensors copied), so that timing round-robin over them streams from memory:
    ``copies`` in all, default enough to exceed 2.5× the L2 cache on CUDA (at most 256) and 1 elsewhere."""
    if copies is None:
        if matrix.device.type != "cuda":
            copies = 1
        else:
            l2 = getattr(torch.cuda.get_device_properties(matrix.device), "L2_cache_size", 0) or _L2_FALLBACK
            copies = max(2, min(256, math.ceil(2.5 * l2 / max(matrix.nbytes, 1))))
    clone = lambda: dataclasses.replace(matrix, **{p: getattr(matrix, p).clone() for p in matrix.parts})  # noqa: E731
    return [matrix] + [clone() for _ in range(copies - 1)]


def _inputs(k: Any, bn: int, reads_x: bool) -> dict[bool, torch.Tensor]:
    """The factor's input as ``dispatch`` hands it over, keyed by the config's ``XF32``: ``bn`` tokens of ``x`` in
    the values' dtype for the factor that reads ``x``, else the fp32 intermediate; packed when ``bn > 1``."""
    x = torch.randn(bn, k.shape[1], device=k.device, dtype=k.compute_dtype if reads_x else torch.float32)
    if bn == 1:
        return {False: x, True: x}
    return {xf32: pack_activations(x, bn, dtype=torch.float32 if xf32 else None) for xf32 in (False, True)}


def _time_all(cands: list[dict], make_fns: Callable[[dict], list], timer: Timer, device: torch.device) -> list[dict]:
    """One record per candidate config: ``{"config", "us"}``, or ``{"config", "error"}`` when it does not compile
    or launch (recorded, never chosen)."""
    records = []
    for cfg in cands:
        try:
            records.append({"config": cfg, "us": float(timer(make_fns(cfg)))})
        except Exception as exc:  # noqa: BLE001 - any failure of one candidate
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            records.append({"config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return records


def _tune_matmul(k: Any, bn: int, reads_x: bool, writes_y: bool, timer: Timer, copies: list[Any]) -> list[dict]:
    op, xs = _OPS[k.layout], _inputs(k, bn, reads_x)
    out_dtype, packed_out = (k.compute_dtype, 0) if writes_y else (torch.float32, bn)

    def make_fns(cfg: dict) -> list:
        x = xs[bool(cfg.get("XF32")) and reads_x]
        return [lambda w=w: op(x, w, n_tokens=bn, out_dtype=out_dtype, packed_out=packed_out, config=cfg)
                for w in copies]

    return _time_all(configs.candidates(k.layout, bn), make_fns, timer, k.device)


def _tune_unpack(k: Any, timer: Timer, copies: list[Any]) -> list[dict]:
    out = torch.empty(k.shape, dtype=k.compute_dtype, device=k.device)
    make_fns = lambda cfg: [lambda w=w: nibble_unpack(w, out, **cfg) for w in copies]  # noqa: E731
    return _time_all(configs.unpack_candidates(), make_fns, timer, k.device)


def tune(chains: Sequence[Sequence[Any]], *, bns: Sequence[int] = (1, 16), timer: Timer | None = None,
         copies: int | None = None, device: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Time every candidate configuration for every ``nibble``/``delta`` factor and token block.

    Args:
        chains: factor chains as ``dispatch.linear`` takes them (outermost first: ``[A, B]`` for DSF, ``[W]``);
            ``dense`` factors are skipped. A key met twice is timed once.
        bns: token blocks ``BN`` to tune the decode kernels for (1 and 16: decode at batch 1 and 3..16).
        timer: ``fns -> µs per call``; default ``graph_timer()`` (CUDA).
        copies: weight copies each timing rotates over (default: ``weight_copies``).
        device: the device name the results are for (default: ``configs.device_name()`` of the factors).
        log: called with one line per tuned key.

    Returns:
        ``{"device", "matmul": [entry], "unpack": [entry], "timings": [record]}``: entries in the tuning-file
        format (the fastest per key, with its ``us``), records every candidate's ``key``, ``config``, ``us`` or
        ``error``.
    """
    timer = timer or graph_timer()
    factors = [k for chain in chains for k in chain if k.layout in _OPS]
    name = device or (configs.device_name(factors[0].device) if factors else None)
    found: dict = {"device": name, "matmul": [], "unpack": [], "timings": []}
    seen: set = set()
    clones: dict[int, list[Any]] = {}

    def copies_of(k: Any) -> list[Any]:
        if id(k) not in clones:
            clones[id(k)] = weight_copies(k, copies)
        return clones[id(k)]

    for chain in chains:
        for i, k in enumerate(chain):
            if k.layout not in _OPS:
                continue
            per_row = configs.slots_per_row(k)
            for bn in bns:
                key = (k.layout, k.shape[0], per_row, bn)
                if key in seen:
                    continue
                seen.add(key)
                records = _tune_matmul(k, bn, reads_x=i == len(chain) - 1, writes_y=i == 0, timer=timer,
                                       copies=copies_of(k))
                _keep(found, "matmul", {"layout": k.layout, "rows": k.shape[0], "per_row": per_row, "BN": bn},
                      records, log)
            if k.layout == "nibble" and ("unpack", k.shape[0], k.slots) not in seen:
                seen.add(("unpack", k.shape[0], k.slots))
                _keep(found, "unpack", {"rows": k.shape[0], "per_row": k.slots}, _tune_unpack(k, timer, copies_of(k)),
                      log)
    return found


def _keep(found: dict, kind: str, key: dict, records: list[dict], log: Callable[[str], None] | None) -> None:
    found["timings"] += [dict(key, kind=kind, **r) for r in records]
    best = min((r for r in records if "us" in r), key=lambda r: r["us"], default=None)
    if best is not None:
        found[kind].append(dict(key, config=best["config"], us=round(best["us"], 3)))
    if log:
        log(f"{kind} {key}: " + (f"{best['us']:.2f} us {best['config']}" if best else "no candidate ran"))


def format_tuning(doc: dict) -> str:
    """A tuning file's JSON text, one entry per line (readable diffs)."""
    lines = ["{", f'  "format": {json.dumps(configs.FORMAT)},', f'  "version": {configs.VERSION},', '  "devices": {']
    names = sorted(doc["devices"])
    for d, name in enumerate(names):
        table = doc["devices"][name]
        lines.append(f"    {json.dumps(name)}: {{")
        parts = [k for k in table if k not in ("matmul", "unpack")] + [k for k in ("matmul", "unpack") if k in table]
        for p, part in enumerate(parts):
            comma = "," if p < len(parts) - 1 else ""
            if part not in ("matmul", "unpack"):
                lines.append(f"      {json.dumps(part)}: {json.dumps(table[part])}{comma}")
                continue
            lines.append(f'      "{part}": [')
            lines += [f"        {json.dumps(e)}{',' if j < len(table[part]) - 1 else ''}"
                      for j, e in enumerate(table[part])]
            lines.append(f"      ]{comma}")
        lines.append("    }" + ("," if d < len(names) - 1 else ""))
    return "\n".join(lines + ["  }", "}"]) + "\n"


def _sort_key(entry: dict) -> tuple:
    return (entry.get("layout", ""), entry["rows"], entry["per_row"], entry.get("BN", entry.get("tokens", 0)))


def write_tuning(path: str | Path, found: dict, *, source: str | None = None) -> Path:
    """Merge ``tune``'s result into the tuning file ``path`` (created if missing): the device's entries with the
    same keys are replaced, other keys and devices kept. Written atomically (a temporary file in the same
    directory, then renamed).

    Raises:
        ValueError: ``found`` names no device (tuned without CUDA and without ``device=``).
        configs.TuningFileError: ``path`` exists but is not a tuning file.
    """
    path = Path(path)
    if not found.get("device"):
        raise ValueError("the tuning result names no device; pass tune(..., device='<GPU name>')")
    doc = {"format": configs.FORMAT, "version": configs.VERSION, "devices": {}}
    if path.exists():
        configs.read_tuning(path)  # checks it, naming the file
        doc = json.loads(path.read_text(encoding="utf-8"))
    table = doc["devices"].setdefault(found["device"], {})
    if source:
        table["source"] = source
    for kind in ("matmul", "unpack"):
        entries = {_sort_key(e): e for e in table.get(kind, [])}
        entries.update({_sort_key(e): e for e in found[kind]})
        table[kind] = [entries[k] for k in sorted(entries)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(format_tuning(doc))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    configs.tables.cache_clear()
    return path
