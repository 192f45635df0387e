"""Compiled CPU kernels for the ``bitmask`` layout (a C++ torch extension, ``kernels/cpu/bitmask_matmul.cpp``).

- ``build(verbose, isa)``: compile it (g++, ninja) into ``$DSF_CACHE/torch_extensions`` (default ``~/.cache/dsf``);
  ``scripts/setup.sh`` runs ``python -m dsf_runtime.kernels.cpu build``.
- ``available()``: why the kernel cannot run (None when it can). Loads an already-built extension; builds only
  when ``DSF_BUILD_CPU_KERNELS=1``.
- ``bitmask_linear(x, factors)``: ``y = F₀·(F₁·(…·x))`` for bitmask factors in one call (a DSF layer is
  ``A·(B·x)``), fp32 in, between and out; ``bitmask_matmul`` is the one-factor case.
- ``dense_linear(x, weight, scale)``: ``y = x·Wᵀ`` for a dense fp16/bf16 ``W``, or an int8 ``W`` with one scale per
  row, with fp32 ``x`` and ``y``.

int8 values carry one scale per row (docs/format.md, "Quantized tensors"): dot products accumulate over the int8
values in fp32 and are multiplied by the row's scale once. float8 e4m3fn codes (row scales) and int4 codes (two per
byte, one scale per ``group_size`` columns) are decoded a row at a time into an fp32 buffer, then multiplied.

The vector path is the best this CPU runs (``ISAS``: AVX-512 with VBMI2 expand-loads, AVX2+FMA+F16C, scalar);
``isa`` picks a lower one (tests check every path the CPU can run). The build's name carries a hash of the source,
the compiler flags, torch and Python, so a changed source or a new torch is never served by a stale binary.
Nothing here imports the formats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ISAS", "available", "bitmask_linear", "bitmask_matmul", "build", "build_dir", "dense_linear", "isas"]

SOURCE = Path(__file__).with_name("cpu") / "bitmask_matmul.cpp"
# Vector paths, best first: /proc/cpuinfo flags each needs -> the compiler flags that enable it.
ISAS: dict[str, dict[str, str]] = {
    "avx512": {"avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl",
               "avx512_vbmi2": "-mavx512vbmi2", "avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"},
    "avx2": {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"},
    "scalar": {},
}
_state: dict[str, ModuleType | str | None] = {}
_NO_SCALE = torch.empty(0)  # the kernel's "no scales" (float values)


def build_dir() -> Path:
    """Where compiled extensions live: ``$DSF_CACHE/torch_extensions`` (default ``~/.cache/dsf``)."""
    return Path(os.environ.get("DSF_CACHE", Path.home() / ".cache" / "dsf")).expanduser() / "torch_extensions"


@cache
def isas() -> tuple[str, ...]:
    """The vector paths this CPU can run, best first (always ends with ``"scalar"``)."""
    try:
        words = next(
            (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")),
            [],
        )
    except OSError:
        words = []
    return tuple(isa for isa, flags in ISAS.items() if set(flags) <= set(words))


def _cflags(isa: str) -> tuple[str, ...]:
    """``-O3 -fopenmp`` plus the ``-m`` flags of vector path ``isa``."""
    return ("-O3", "-fopenmp", *ISAS[isa].values())


def _name(isa: str) -> str:
    """Extension name: ``dsf_cpu_`` + a hash of the source, flags, torch and Python versions."""
    key = b"\0".join([SOURCE.read_bytes(), " ".join(_cflags(isa)).encode(), torch.__version__.encode(),
                      sys.version.encode()])
    return "dsf_cpu_" + hashlib.sha256(key).hexdigest()[:12]


def _library(name: str) -> Path:
    return build_dir() / name / f"{name}.so"


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False, isa: str | None = None) -> ModuleType:
    """Compile the extension for vector path ``isa`` (default: the best this CPU runs; a no-op when this source,
    these flags and this torch are built already) and load it. The default build becomes the one the runtime
    uses; another ``isa`` is only returned (for tests).

    Raises:
        ValueError: ``isa`` is not one this CPU runs.
        RuntimeError/OSError/subprocess errors: no compiler, no ninja, or a compile error (the message says which).
    """
    from torch.utils import cpp_extension

    best = isas()[0]
    if isa is not None and isa not in isas():
        raise ValueError(f"this CPU runs the vector paths {list(isas())}, not {isa!r}")
    try:  # the PyPI ``ninja`` package's binary, when the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    isa = isa or best
    name = _name(isa)
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=list(_cflags(isa)), extra_ldflags=["-fopenmp"],
        build_directory=str(directory), verbose=verbose,
    )
    if isa == best:
        _state["module"], _state["reason"] = module, None
    return module


def _load() -> ModuleType | str:
    """The extension of the best vector path, or why it is unavailable."""
    name = _name(isas()[0])
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


def _module() -> ModuleType:
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    return _state["module"]


def bitmask_linear(
    x: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, int | None]],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = F₀·(F₁·(…·x))`` for bitmask factors, in one call; intermediates are fp32 buffers of ``[T, rows]``.

    Args:
        x: ``[..., cols of the last factor]`` float32, contiguous.
        factors: outermost first, each ``(values, bitmask, row_ptr, scales, cols, group_size)``: values ``[nnz]``
            float16/bfloat16/float32, int8 or float8_e4m3fn codes, or with ``group_size`` int4 codes uint8
            ``[ceil(nnz / 2)]`` (docs/format.md "Quantized values"); scales float16/bfloat16/float32 ``[rows]`` for
            int8/float8 codes (value = code × its row's scale), ``[rows, ceil(cols / group_size)]`` for int4, else
            None; bitmask ``[rows, ceil(cols / 8)]`` uint8 (little bit order, padding bits 0), row_ptr ``[rows + 1]``
            int32 consistent with the popcounts (``BitmaskMatrix.validate``); each factor's ``cols`` equals the next
            one's rows.
        out: optional ``[..., rows of F₀]`` float32 to write into.

    Returns:
        ``[..., rows of F₀]`` float32.

    Raises:
        RuntimeError: the kernel is unavailable (``available()`` says why), or an argument is mistyped (the
            kernel's check names it).
    """
    values, bitmasks, row_ptrs, scales, cols, groups = zip(*factors) if factors else ((),) * 6
    scales = [_NO_SCALE if s is None else s for s in scales]
    return _module().bitmask_linear(x, list(values), list(bitmasks), list(row_ptrs), scales, list(cols),
                                    [g or 0 for g in groups], out)


def bitmask_matmul(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_ptr: torch.Tensor, cols: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x·Wᵀ`` for one ``W`` in the ``bitmask`` layout: ``bitmask_linear`` with one factor."""
    return bitmask_linear(x, [(values, bitmask, row_ptr, None, cols, None)], out)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x·Wᵀ`` for a dense ``W`` kept in 16 or 8 bits (a tied lm_head), computed in fp32.

    Args:
        x: ``[..., in]`` float32, contiguous.
        weight: ``[out, in]`` float16/bfloat16/float32, or int8 with ``scale``; contiguous.
        scale: ``[out]`` float16/bfloat16/float32 row scales of an int8 ``weight`` (``W[i] = weight[i] ·
            scale[i]``); None for a floating ``weight``.
        out: optional ``[..., out]`` float32 to write into.

    Returns:
        ``[..., out]`` float32.
    """
    return _module().dense_linear(x, weight, scale, out)


def simd() -> str | None:
    """The vector path the loaded build uses (``"avx512"``, ``"avx2+fma+f16c"`` or ``"scalar"``), None when
    unavailable."""
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
    print(f"[dsf] CPU kernel built in {build_dir() / _name(isas()[0])} ({simd()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
