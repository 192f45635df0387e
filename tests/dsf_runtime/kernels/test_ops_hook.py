"""The dsf_runtime.ops hook: importing the kernels registers them; packed matrices convert once and are cached."""

import pytest
import torch

from dsf_runtime.kernels import _ops_hook
from tests.dsf_runtime.kernels.conftest import rel_err, sparse_random

formats = pytest.importorskip("dsf_runtime.formats")
ops = pytest.importorskip("dsf_runtime.ops")


def test_registered():
    assert _ops_hook.register()
    for layout in _ops_hook.LAYOUTS:
        assert ("matmul", layout) in ops._KERNELS and ("dsf", layout) in ops._KERNELS


def test_hooks_compute_and_cache(device):
    gen = torch.Generator().manual_seed(8)
    A, B = sparse_random(30, 20, 0.3, gen=gen).to(device), sparse_random(20, 50, 0.4, gen=gen).to(device)
    pA, pB = formats.pack(A, "csr"), formats.pack(B, "bitmask")
    x = torch.randn(3, 50, generator=gen).half().to(device)
    y = _ops_hook._dsf(x, pA, pB)
    assert rel_err(y, (x.double().cpu() @ B.double().cpu().t()) @ A.double().cpu().t()) <= 1e-2
    assert _ops_hook.kernel_matrix(pA, torch.float16) is _ops_hook.kernel_matrix(pA, torch.float16)
    z = _ops_hook._matmul(x, pB, torch.float32)
    assert z.dtype == torch.float32 and rel_err(z, x.double().cpu() @ B.double().cpu().t()) <= 1e-2
