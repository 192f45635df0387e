"""What the ``dsf`` command groups share: the error exit and the choice of value dtype."""

from __future__ import annotations

from enum import Enum

import typer

__all__ = ["DType", "fail"]


class DType(str, Enum):
    """Floating dtype of weights or values."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` in red on stderr and return the exit (status 1) for the caller to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)
