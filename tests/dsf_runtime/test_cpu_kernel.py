"""The compiled CPU kernel of the ``bitmask`` layout (``dsf_runtime.kernels.cpu``) against a float64 reference,
and ``BitmaskMatrix.matmul`` taking it. Builds the extension when it is not built (tens of seconds, once)."""

from __future__ import annotations

import shutil

import pytest
import torch

from dsf_runtime.formats.bitmask import BitmaskMatrix
from dsf_runtime.formats._common import PackedMixin
from dsf_runtime.kernels import cpu


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler (g++): the CPU kernel cannot be built; scripts/setup.sh installs it")
    if cpu.available() is not None:
        cpu.build()
    assert cpu.available() is None
    return cpu


def _matrix(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> BitmaskMatrix:
    """Random ~50% sparse matrix with an empty first row and an all-dense last row."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=gen)
    dense[torch.rand(rows, cols, generator=gen) < 0.5] = 0
    dense[0] = 0
    dense[-1] = torch.randn(cols, generator=gen).clamp(min=0.01)
    return BitmaskMatrix.from_dense(dense, dtype=dtype)


def _run(m: BitmaskMatrix, x: torch.Tensor, **kw) -> torch.Tensor:
    return cpu.bitmask_matmul(x, m.values, m.bitmask, m.row_ptr, *m.shape, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("shape", [(2, 1), (7, 13), (33, 130), (70, 200), (5, 64)])
def test_matches_float64_reference(kernel, dtype, tokens, shape):
    m = _matrix(*shape, dtype)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(1))
    y = _run(m, x)
    ref = x.double() @ m.to_dense(torch.float64).T
    assert y.dtype == torch.float32 and y.shape == (tokens, shape[0])
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert (y[:, 0] == 0).all()  # the empty row


def test_all_empty_and_all_dense(kernel):
    x = torch.randn(3, 100)
    empty = BitmaskMatrix.from_dense(torch.zeros(9, 100), dtype=torch.float16)
    assert (_run(empty, x) == 0).all()
    full = BitmaskMatrix.from_dense(torch.randn(9, 100).abs() + 0.1, dtype=torch.bfloat16)
    torch.testing.assert_close(_run(full, x).double(), x.double() @ full.to_dense(torch.float64).T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 17])
def test_out_overwrites_nan_poison(kernel, tokens):
    m = _matrix(40, 75, torch.float16)
    x = torch.randn(tokens, 75)
    out = torch.full((tokens, 40), float("nan"))
    y = _run(m, x, out=out)
    assert y.data_ptr() == out.data_ptr() and not out.isnan().any()
    torch.testing.assert_close(out, _run(m, x))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 20, dtype=torch.float64)}, "x must be float32"),
        ({"x": torch.randn(2, 21)}, "x must be float32"),
        ({"x": torch.randn(20, 2).T}, "contiguous"),
        ({"values": torch.zeros(1, dtype=torch.int8)}, "values must be 1-D"),
        ({"bitmask": torch.zeros(10, 2, dtype=torch.uint8)}, "bitmask must be uint8"),
        ({"row_ptr": torch.zeros(11, dtype=torch.int64)}, "row_ptr must be int32"),
        ({"row_ptr": torch.zeros(11, dtype=torch.int32)}, "row_ptr must run from 0 to nnz"),
        ({"out": torch.empty(2, 11)}, "out must be"),
    ],
)
def test_bad_inputs_raise(kernel, change, message):
    m = _matrix(10, 20, torch.float16)
    args = {"x": torch.randn(2, 20), "values": m.values, "bitmask": m.bitmask, "row_ptr": m.row_ptr, "out": None}
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        cpu.bitmask_matmul(args["x"], args["values"], args["bitmask"], args["row_ptr"], 10, 20, out=args["out"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bitmask_matmul_takes_the_kernel(kernel, monkeypatch, dtype):
    m = _matrix(48, 96, dtype)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    calls = []
    real = cpu.bitmask_matmul
    monkeypatch.setattr(cpu, "bitmask_matmul", lambda *a, **k: calls.append(a) or real(*a, **k))
    y = m.matmul(x, torch.float32)
    assert len(calls) == 1 and y.shape == (2, 3, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, PackedMixin.matmul(m, x, torch.float32), rtol=1e-5, atol=1e-5)
    assert m.matmul(x).dtype == torch.bfloat16


def test_falls_back_with_a_reason(monkeypatch, caplog):
    m = _matrix(8, 16, torch.float16)
    x = torch.randn(2, 16)
    monkeypatch.setattr(cpu, "available", lambda: "not built (test)")
    with caplog.at_level("INFO", logger="dsf_runtime.formats.bitmask"):
        y = m.matmul(x)
    torch.testing.assert_close(y, PackedMixin.matmul(m, x))
    assert "not built (test)" in caplog.text


def test_many_tokens_take_the_dense_gemm_path(kernel, monkeypatch):
    from dsf_runtime.formats.bitmask import CPU_KERNEL_MAX_TOKENS

    m = _matrix(48, 96, torch.float16)
    calls = []
    real = cpu.bitmask_matmul
    monkeypatch.setattr(cpu, "bitmask_matmul", lambda *a, **k: calls.append(a) or real(*a, **k))
    at_limit, above = torch.randn(CPU_KERNEL_MAX_TOKENS, 96), torch.randn(CPU_KERNEL_MAX_TOKENS + 1, 96)
    m.matmul(at_limit)
    assert len(calls) == 1
    y = m.matmul(above)
    assert len(calls) == 1  # unpack + GEMM, the same numbers
    reference = above.double() @ m.to_dense(torch.float64).t()
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)
