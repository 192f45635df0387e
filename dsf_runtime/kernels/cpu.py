"""Compiled CPU kernel for the ``bitmask`` layout (a C++ torch extension, ``kernels/cpu/bitmask_matmul.cpp``).

- ``build(verbose)``: compile it (g++, ninja) into ``$DSF_CACHE/torch_extensions`` (default ``~/.cache/dsf``);
  ``scripts/setup.sh`` runs ``python -m dsf_runtime.kernels.cpu build``.
- ``available()``: why the kernel cannot run (None when it can). Loads an already-built extension; builds only
  when ``DSF_BUILD_CPU_KERNELS=1``.
- ``bitmask_matmul(x, values, bitmask, row_ptr, rows, cols)``: ``y = x·Wᵀ`` in fp32.

The build's name carries a hash of the source, the compiler flags, torch and Python, so a changed source or a
new torch is never served by a stale binary. Nothing here imports the formats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "bitmask_matmul", "build", "build_dir"]

SOURCE = Path(__file__).with_name("cpu") / "bitmask_matmul.cpp"
_VECTOR_FLAGS = ("avx2", "fma", "f16c")  # /proc/cpuinfo flags the AVX2 path needs; -m<flag> each
_state: dict[str, ModuleType | str | None] = {}


def build_dir() -> Path:
    """Where compiled extensions live: ``$DSF_CACHE/torch_extensions`` (default ``~/.cache/dsf``)."""
    return Path(os.environ.get("DSF_CACHE", Path.home() / ".cache" / "dsf")).expanduser() / "torch_extensions"


@cache
def _cflags() -> tuple[str, ...]:
    """``-O3 -fopenmp``, plus ``-mavx2 -mfma -mf16c`` when this CPU has all three."""
    try:
        words = next(
            (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")),
            [],
        )
    except OSError:
        words = []
    vector = tuple(f"-m{flag}" for flag in _VECTOR_FLAGS) if set(_VECTOR_FLAGS) <= set(words) else ()
    return ("-O3", "-fopenmp", *vector)


def _name() -> str:
    """Extension name: ``dsf_cpu_`` + a hash of the source, flags, torch and Python versions."""
    key = b"\0".join([SOURCE.read_bytes(), " ".join(_cflags()).encode(), torch.__version__.encode(),
                      sys.version.encode()])
    return "dsf_cpu_" + hashlib.sha256(key).hexdigest()[:12]


def _library(name: str) -> Path:
    return build_dir() / name / f"{name}.so"


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False) -> ModuleType:
    """Compile the extension (a no-op when this source, these flags and this torch are built already) and load it.

    Raises:
        RuntimeError/OSError/subprocess errors: no compiler, no ninja, or a compile error (the message says which).
    """
    from torch.utils import cpp_extension

    try:  # the PyPI ``ninja`` package's binary, when the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    name = _name()
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=list(_cflags()), extra_ldflags=["-fopenmp"],
        build_directory=str(directory), verbose=verbose,
    )
    _state["module"], _state["reason"] = module, None
    return module


def _load() -> ModuleType | str:
    """The extension, or why it is unavailable."""
    name = _name()
    if _library(name).exists():
        try:
            return _import(_library(name), name)
        except Exception as exc:  # noqa: BLE001 - a broken binary means: fall back, say why
            return f"loading {_library(name)} failed: {type(exc).__name__}: {exc}"
    if os.environ.get("DSF_BUILD_CPU_KERNELS") == "1":
        try:
            return build()
        except Exception as exc:  # noqa: BLE001 - a failed build means: fall back, say why
            return f"building the CPU kernel failed: {type(exc).__name__}: {str(exc)[-500:]}"
    return ("the CPU kernel is not built (run scripts/setup.sh or `python -m dsf_runtime.kernels.cpu build`, "
            "or set DSF_BUILD_CPU_KERNELS=1)")


def available() -> str | None:
    """None when the compiled kernel can run, else why not (decided once per process)."""
    if "reason" not in _state:
        loaded = _load()
        _state["module"], _state["reason"] = (None, loaded) if isinstance(loaded, str) else (loaded, None)
    return _state["reason"]


def bitmask_matmul(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_ptr: torch.Tensor, rows: int,
                   cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x·Wᵀ`` for ``W`` in the ``bitmask`` layout, on the CPU.

    Args:
        x: ``[T, cols]`` float32, contiguous.
        values: ``[nnz]`` float16/bfloat16/float32; bitmask: ``[rows, ceil(cols / 8)]`` uint8 (little bit order,
            padding bits 0); row_ptr: ``[rows + 1]`` int32, consistent with the popcounts (``validate``).
        out: optional ``[T, rows]`` float32 to write into.

    Returns:
        ``[T, rows]`` float32.

    Raises:
        RuntimeError: the kernel is unavailable (``available()`` says why), or an argument is mistyped (the
            kernel's check names it).
    """
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    return _state["module"].bitmask_matmul(x, values, bitmask, row_ptr, rows, cols, out)


def simd() -> str | None:
    """The vector path the loaded build uses (``"avx2+fma+f16c"`` or ``"scalar"``), None when unavailable."""
    return None if available() else _state["module"].simd()


def main(argv: list[str]) -> int:
    """``python -m dsf_runtime.kernels.cpu build [--quiet]``: compile the kernel; exit status 1 with the reason when
    it cannot be built (the pure-torch path keeps working)."""
    if argv[:1] != ["build"]:
        print("usage: python -m dsf_runtime.kernels.cpu build [--quiet]", file=sys.stderr)
        return 2
    try:
        build(verbose="--quiet" not in argv)
    except Exception as exc:  # noqa: BLE001 - report any failure in one line
        print(f"[dsf] CPU kernel not built ({type(exc).__name__}: {str(exc)[-800:]}); "
              "the pure-torch CPU path will be used", file=sys.stderr)
        return 1
    print(f"[dsf] CPU kernel built in {build_dir() / _name()} ({simd()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
