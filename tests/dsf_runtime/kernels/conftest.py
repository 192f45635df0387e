"""Kernel tests run the real Triton kernels: on CUDA when there is a GPU, else on CPU under TRITON_INTERPRET=1.

The variable must be set before the kernel modules are imported (``@triton.jit`` decides at decoration time);
if another test imported them first without it, they are re-imported here.
"""

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNEL_MODULES = [
    "dsf_runtime.kernels._interpreter_compat", "dsf_runtime.kernels.configs", "dsf_runtime.kernels.pack_activations",
    "dsf_runtime.kernels._io", "dsf_runtime.kernels.nibble_matmul", "dsf_runtime.kernels.delta_matmul",
    "dsf_runtime.kernels.nibble_unpack", "dsf_runtime.kernels.delta_unpack", "dsf_runtime.kernels.tile_matmul",
    "dsf_runtime.kernels.dispatch",
    "dsf_runtime.kernels",
]


def _ensure_interpreted() -> None:
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1" or "dsf_runtime.kernels.dispatch" not in sys.modules:
        return
    from dsf_runtime.kernels.dispatch import interpreted

    if not interpreted():
        for name in _KERNEL_MODULES:
            importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


_ensure_interpreted()
from dsf_runtime.kernels import _interpreter_compat  # noqa: E402

_interpreter_compat.apply()


@pytest.fixture(autouse=True)
def interpret_kernels_on_cpu(monkeypatch) -> None:
    """Kernel layouts on the CPU compute through the interpreted kernels in these tests only."""
    monkeypatch.setenv("DSF_INTERPRET_KERNELS", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere fails."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "output has NaN (unwritten or poisoned element)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sparse_random(rows: int, cols: int, density: float, dtype=torch.float16, device="cpu", gen=None) -> torch.Tensor:
    """Random matrix with an unstructured mask of about ``density`` (values never zero)."""
    w = torch.randn(rows, cols, generator=gen) + 0.1
    keep = torch.rand(rows, cols, generator=gen) < density
    return (w * keep).to(dtype).to(device)


def balanced_random(rows: int, cols: int, per_group: int, group: int = 16, dtype=torch.float16, device="cpu",
                    gen=None) -> torch.Tensor:
    from dsf_runtime.formats.nibble import balance_mask

    w = torch.randn(rows, cols, generator=gen) + 0.1
    mask = balance_mask(torch.rand(rows, cols, generator=gen), per_group, group)
    return (w * mask).to(dtype).to(device)
