"""Triton kernels for the GPU layouts ``nibble`` and ``delta`` of ``dsf_runtime.formats``, with pure-torch
references. The kernels take the layouts' named tensors (``values``, ``index``, ``row_ptr``) and scalars; nothing
here imports the formats.

- ``dispatch.linear(x, factors, bias)``: ``y = F₀·(F₁·(…·x)) + b`` for a chain of ``nibble``/``delta``/``dense``
  matrices, choosing the decode (streaming) or prefill (decompress + cuBLAS) path by token count; CUDA-graph
  capturable once each token count ran once.
- ``unavailable_reason(device)``: why the kernels cannot run on ``device`` (None when they can). Importing this
  package does not import Triton; the kernel modules are imported on first use.
- ``configs``: launch configurations (a tuning file per GPU, a heuristic otherwise).
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["unavailable_reason"]

_REASONS: dict[str, str | None] = {}


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can (cached per device type).

    They run on CUDA devices when Triton is installed. On the CPU they run only in Triton's interpreter, which is
    for tests: the kernels must have been imported under ``TRITON_INTERPRET=1`` and ``DSF_INTERPRET_KERNELS=1`` must
    be set (the kernel tests set both), so that other CPU work keeps the fast pure-torch path.
    """
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type  # per forward: no parse
    if kind == "cpu" and os.environ.get("DSF_INTERPRET_KERNELS") != "1":  # decided before Triton is imported
        return "on the CPU the kernels run only in Triton's interpreter, for tests (DSF_INTERPRET_KERNELS=1)"
    if kind not in _REASONS:
        _REASONS[kind] = _reason(kind)
    return _REASONS[kind]


def _reason(kind: str) -> str | None:
    if kind not in ("cuda", "cpu"):
        return f"the kernels run on CUDA devices, not on {kind}"
    if kind == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'dsf-toolkit[gpu]')"
    try:
        from dsf_runtime.kernels.dispatch import interpreted
    except Exception as exc:  # noqa: BLE001 - any import failure means: no kernels, say why
        return f"importing dsf_runtime.kernels failed: {type(exc).__name__}: {exc}"
    if kind == "cpu" and not interpreted():
        return "the kernels run on CUDA devices (on the CPU only under TRITON_INTERPRET=1)"
    return None
