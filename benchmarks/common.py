"""What every benchmark script shares: the run metadata written into its JSON (device, versions, date, git commit)
and the GPU timing (CUDA-graph replays timed with CUDA events, ``dsf_runtime.kernels.timing``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["DRY_RUN_CAVEAT", "caveat_lines", "device_name", "git_sha", "run_meta", "time_calls", "utc_now"]

ROOT = Path(__file__).resolve().parents[1]


def _sh(*cmd: str) -> str | None:
    """Stripped stdout of ``cmd``, None when it is missing, fails or prints nothing."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


# Said on every log, table and plot of a dry run (tiny shapes on the CPU, kernels in the Triton interpreter).
DRY_RUN_CAVEAT = "DRY RUN on the CPU (tiny shapes, checks the code paths only): NOT a speed measurement"


def caveat_lines(meta: dict) -> list[str]:
    """``["**<DRY_RUN_CAVEAT>**", ""]`` for a dry run's markdown (``meta["dry_run"]``), else ``[]``."""
    return [f"**{DRY_RUN_CAVEAT}**", ""] if meta.get("dry_run") else []


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_sha() -> str | None:
    """The checkout's commit (``DSF_GIT_SHA`` overrides it, e.g. on a machine without the .git directory)."""
    return os.environ.get("DSF_GIT_SHA") or _sh("git", "-C", str(ROOT), "rev-parse", "HEAD")


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for CUDA (default: CUDA when available), else the CPU and torch's thread count."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_meta(device: torch.device | str | None = None, *, method: str | None = None,
             packages: Sequence[str] = ("triton", "transformers")) -> dict:
    """Metadata of one benchmark run.

    Returns:
        ``{"device", "driver", "torch", "cuda", <each of packages>, "python", "date", "git_sha", "git_dirty"}``
        plus ``"method"`` when given. ``driver`` is nvidia-smi's (None without it); ``git_dirty``: uncommitted
        changes in the checkout (``DSF_GIT_DIRTY=1`` forces it).
    """
    meta = {
        "device": device_name(device),
        "driver": _sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        **{p: _version(p) for p in packages},
        "python": platform.python_version(), "date": utc_now(), "git_sha": git_sha(),
        "git_dirty": os.environ.get("DSF_GIT_DIRTY") == "1" or bool(_sh("git", "-C", str(ROOT), "status",
                                                                        "--porcelain")),
    }
    if method:
        meta["method"] = method
    return meta


def time_calls(fns: Sequence[Callable[[], object]], *, calls: int = 30, repeats: int = 5) -> dict:
    """Per-call microseconds of ``fns`` (round-robin, e.g. one per weight copy): ``{"us", "p20", "p80",
    "graphed"}``.

    On CUDA: ``calls`` calls captured in one CUDA graph and replayed ``repeats`` times (median), or timed eagerly
    with ``capture_error`` set when capture fails. Without CUDA (dry runs under ``TRITON_INTERPRET=1``) one call of
    ``fns[0]`` on the wall clock, a stand-in that only checks the code paths: its numbers mean nothing.
    """
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fns[0]()
        return {"us": (time.perf_counter() - start) * 1e6, "p20": None, "p80": None, "graphed": False}
    from dsf_runtime.kernels.timing import eager_time, graph_time

    try:
        return graph_time(fns, calls=calls, repeats=repeats)
    except Exception as exc:  # noqa: BLE001 - e.g. an op that refuses capture: time it eagerly, say why
        torch.cuda.synchronize()
        return dict(eager_time(fns, calls=calls, repeats=repeats), capture_error=repr(exc)[:200])
