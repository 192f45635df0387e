"""Atomic output for the exporters: a directory or an ONNX file pair appears complete or not at all."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_files", "check_destination", "parse_size"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``2GiB``, ``500MB`` or ``1073741824`` (units as Hugging Face's ``max_shard_size``:
    ``GB`` = 10⁹, ``GiB`` = 2³⁰).

    Raises:
        ValueError: not a positive size, naming ``--max-shard-size``.
    """
    if isinstance(text, int):
        number, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"--max-shard-size {text!r} is not a size; use e.g. 2GiB, 500MB or a number of bytes")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return size


def check_destination(dst: Path, *, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an output that would clobber something: a non-empty ``dst`` without ``overwrite``, or a ``dst``
    that is, contains or lies inside one of ``sources``.

    Raises:
        FileExistsError: ``dst`` exists (a non-empty directory or a file) and ``overwrite`` is False.
        ValueError: ``dst`` overlaps a source.
    """
    target = dst.resolve()
    for source in sources:
        src = source.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise ValueError(f"output {dst} overlaps the source {source}; choose another output path")
    occupied = dst.is_file() or (dst.is_dir() and any(dst.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; pass --overwrite to replace it")


def _staging(dst: Path, tag: str) -> Path:
    return dst.with_name(f".{dst.name}.{tag}-{os.getpid()}")


def _fresh_staging(dst: Path, overwrite: bool, sources: tuple[Path, ...]) -> Path:
    """Check ``dst`` (``check_destination``) and create an empty staging directory beside it."""
    check_destination(dst, overwrite=overwrite, sources=sources)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(dst, "tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


@contextmanager
def atomic_directory(dst: Path, *, overwrite: bool, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging directory next to ``dst``; on success it replaces ``dst`` by renames, on error it
    is deleted and ``dst`` is untouched.

    Raises:
        FileExistsError, ValueError: see ``check_destination`` (raised before anything is written).
    """
    dst = Path(dst)
    staging = _fresh_staging(dst, overwrite, sources)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = _staging(dst, "old")
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(staging, dst)
    except BaseException:
        if old.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", dst)


@contextmanager
def atomic_files(main: Path, *, overwrite: bool, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a staging directory; files written there named like ``main`` or ``main.name + suffix`` are moved
    next to ``main`` on success, ``main`` itself last (so a complete-looking ``main`` always has its companions).

    Raises:
        FileExistsError, ValueError: see ``check_destination`` (raised before anything is written).
    """
    main = Path(main)
    staging = _fresh_staging(main, overwrite, sources)
    try:
        yield staging
        written = sorted(staging.iterdir(), key=lambda p: p.name == main.name)
        for path in written:
            os.replace(path, main.with_name(path.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s", main)
