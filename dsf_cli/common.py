"""What the ``dsf`` command groups share: the error exits, the user-error guard of every command, the device check
and the choice of value dtype."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Any

import typer

__all__ = [
    "DEBUG_ENV",
    "USER_ERROR_EXIT",
    "DType",
    "check_device",
    "fail",
    "load_tokenizer",
    "set_debug",
    "user_errors",
]

DEBUG_ENV = "DSF_DEBUG"  # DSF_DEBUG=1 acts like `dsf --debug`
USER_ERROR_EXIT = 2  # exit status of a user error caught by `user_errors`
_debug_flag: ContextVar[bool] = ContextVar("dsf_debug", default=False)


class DType(str, Enum):
    """Floating dtype of weights or values."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` in red on stderr and return the exit (status 1) for the caller to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user error: bad values and files (``ValueError``, which includes the project's
    ``CheckpointError``, ``FormatError`` and ``ConfigError``, JSON and Unicode decode errors), files that are
    missing, present or unwritable (``OSError``, which includes a full disk), and unreadable safetensors files."""
    from safetensors import SafetensorError

    return ValueError, OSError, SafetensorError


def _message(exc: BaseException) -> str:
    """One line for ``exc``: ``<file>: <reason>`` for an OSError naming a file, else its text."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def set_debug(flag: bool) -> None:
    """Record ``dsf --debug`` for the command of this invocation (``user_errors`` clears it when the command ends)."""
    _debug_flag.set(flag)


def _debug() -> bool:
    """Whether tracebacks are wanted: ``dsf --debug`` or ``DSF_DEBUG=1``."""
    return _debug_flag.get() or os.environ.get(DEBUG_ENV) == "1"


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so that a user error (see ``_user_error_types``) prints ``error: <message>`` on stderr and
    exits with status ``USER_ERROR_EXIT`` instead of a traceback; with ``--debug`` (or ``DSF_DEBUG=1``) it
    propagates with its traceback. Wrapping twice has no further effect."""
    if getattr(command, "__dsf_user_errors__", False):
        return command

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _user_error_types() as exc:
            if _debug():
                raise
            typer.secho(f"error: {_message(exc)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(USER_ERROR_EXIT) from exc
        finally:
            set_debug(False)

    guarded.__dsf_user_errors__ = True  # type: ignore[attr-defined]
    return guarded


def check_device(device: str) -> None:
    """Refuse a device that torch cannot use, before anything loads.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``, ... (``auto`` always passes).

    Raises:
        ValueError: naming ``--device`` and the fix: not a device, CUDA without a CUDA device, or an index
            beyond the visible devices.
    """
    if device == "auto":
        return
    import torch

    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from exc
    if resolved.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: CUDA requested but torch sees no CUDA device; use --device cpu")
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in ``directory`` (``AutoTokenizer``, offline).

    Raises:
        ValueError: the tokenizer files do not load (a corrupt ``tokenizer.json``, ...), naming the file and the fix.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # the tokenizer libraries raise anything (JSONDecodeError, KeyError, TypeError, ...)
        file = directory / "tokenizer.json"
        raise ValueError(
            f"{file if file.exists() else directory}: the tokenizer does not load ({type(exc).__name__}: {exc}); "
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) from the base model again"
        ) from exc
