"""The compiled CPU kernels (``dsf_runtime.kernels.cpu``) against float64 references, for every vector path this
CPU runs (AVX-512, AVX2, scalar), and the runtime taking them (``BitmaskMatrix.matmul``, ``modules.linear``).
Builds the extensions that are not built yet (about a minute each, once)."""

from __future__ import annotations

import shutil

import pytest
import torch

from dsf_runtime.formats._common import PackedMixin
from dsf_runtime.formats.bitmask import CPU_KERNEL_MAX_TOKENS, BitmaskMatrix
from dsf_runtime.kernels import cpu
from dsf_runtime.modules import linear

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _need_compiler():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler (g++): the CPU kernel cannot be built; scripts/setup.sh installs it")


@pytest.fixture(scope="module")
def kernel():
    """The runtime's build (the best vector path)."""
    _need_compiler()
    if cpu.available() is not None:
        cpu.build()
    assert cpu.available() is None
    return cpu


@pytest.fixture(scope="module", params=cpu.isas())
def ext(request):
    """The extension module of one vector path."""
    _need_compiler()
    return cpu.build(isa=request.param)


def _matrix(rows: int, cols: int, dtype: torch.dtype, seed: int = 0, density: float = 0.5) -> BitmaskMatrix:
    """Random sparse matrix with an empty first row and an all-dense last row."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=gen)
    dense[torch.rand(rows, cols, generator=gen) >= density] = 0
    dense[0] = 0
    dense[-1] = torch.randn(cols, generator=gen).abs() + 0.01
    return BitmaskMatrix.from_dense(dense, dtype=dtype)


def _parts(m: BitmaskMatrix) -> tuple:
    return m.values, m.bitmask, m.row_ptr, m.scales, m.shape[1], m.group_size


def _int8_parts(m: BitmaskMatrix, seed: int = 0) -> tuple[tuple, torch.Tensor]:
    """``m``'s mask with random int8 values (never 0) and random positive fp16 row scales; and the float64 matrix
    they encode (value × row scale)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(1, 128, (m.nnz,), generator=gen, dtype=torch.int8) * torch.where(
        torch.rand(m.nnz, generator=gen) < 0.5, -1, 1).to(torch.int8)
    scale = (torch.rand(m.shape[0], generator=gen) + 0.01).to(torch.float16)
    mask = m.to_dense(torch.float32) != 0
    dense = torch.zeros(m.shape, dtype=torch.float64)
    dense[mask] = q.double()
    return (q, m.bitmask, m.row_ptr, scale, m.shape[1], None), dense * scale.double()[:, None]


def _coded(m: BitmaskMatrix, code: str, seed: int = 0, group_size: int = 64) -> BitmaskMatrix:
    """``m``'s mask holding random non-zero codes: ``"fp8"`` (float8_e4m3fn, fp16 row scales) or ``"int4"`` (in
    [-7, 7], fp16 scales per ``group_size`` columns)."""
    gen = torch.Generator().manual_seed(seed)
    mask = m.to_dense(torch.float32) != 0
    rows, cols = m.shape
    magnitude = torch.randint(1, 8, m.shape, generator=gen) * torch.where(torch.rand(m.shape, generator=gen) < 0.5, -1, 1)
    if code == "int4":
        codes = (magnitude * mask).to(torch.int8)
        scales = (torch.rand(rows, -(-cols // group_size), generator=gen) + 0.01).to(torch.float16)
        return BitmaskMatrix.from_dense(codes, scales=scales, group_size=group_size)
    codes = (magnitude.float() * torch.rand(m.shape, generator=gen).add(0.5) * mask).to(torch.float8_e4m3fn)
    scales = (torch.rand(rows, generator=gen) + 0.01).to(torch.float16)
    return BitmaskMatrix.from_dense(codes, scales=scales)


def _run(ext, factors: list, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The extension's chain over ``factors``: BitmaskMatrix or ``_int8_parts`` tuples."""
    parts = [_parts(f) if isinstance(f, BitmaskMatrix) else f for f in factors]
    values, bitmasks, row_ptrs, scales, cols, groups = zip(*parts)
    scales = [torch.empty(0) if s is None else s for s in scales]
    return ext.bitmask_linear(x, list(values), list(bitmasks), list(row_ptrs), scales, list(cols),
                              [g or 0 for g in groups], out)


def _close(y: torch.Tensor, reference: torch.Tensor) -> None:
    """``y`` equals the float64 ``reference`` within 1e-5 of the reference's largest magnitude (fp32
    accumulation and fp32 intermediates: the error scales with the values, not with each element)."""
    scale = max(reference.abs().max().item(), 1.0)
    torch.testing.assert_close(y.double() / scale, reference / scale, rtol=0, atol=1e-5)


def _reference(factors: list[BitmaskMatrix], x: torch.Tensor) -> torch.Tensor:
    h = x.double()
    for f in reversed(factors):
        h = h @ f.to_dense(torch.float64).T
    return h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("shape", [(2, 1), (7, 13), (33, 130), (70, 200), (5, 64), (6, 65), (4, 127), (3, 576)])
def test_one_factor_matches_float64(ext, dtype, tokens, shape):
    m = _matrix(*shape, dtype)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(1))
    y = _run(ext, [m], x)
    assert y.dtype == torch.float32 and y.shape == (tokens, shape[0])
    _close(y, _reference([m], x))
    assert (y[:, 0] == 0).all()  # the empty row


@pytest.mark.parametrize("tokens", range(1, 18))
def test_chain_matches_float64_every_token_count(ext, tokens):
    A, B = _matrix(70, 45, torch.float16, seed=2, density=0.3), _matrix(45, 131, torch.bfloat16, seed=3)
    x = torch.randn(tokens, 131, generator=torch.Generator().manual_seed(tokens))
    _close(_run(ext, [A, B], x), _reference([A, B], x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_three_factors_and_leading_dims(ext, dtype):
    fs = [_matrix(9, 33, dtype, seed=4), _matrix(33, 64, dtype, seed=5), _matrix(64, 200, dtype, seed=6)]
    x = torch.randn(2, 3, 200)
    y = _run(ext, fs, x)
    assert y.shape == (2, 3, 9)
    _close(y, _reference(fs, x))


def test_all_empty_and_all_dense(ext):
    x = torch.randn(3, 100)
    empty = BitmaskMatrix.from_dense(torch.zeros(9, 100), dtype=torch.float16)
    assert (_run(ext, [empty], x) == 0).all()
    full = BitmaskMatrix.from_dense(torch.randn(9, 100).abs() + 0.1, dtype=torch.bfloat16)
    _close(_run(ext, [full], x), _reference([full], x))
    empty_inner = BitmaskMatrix.from_dense(torch.zeros(100, 100), dtype=torch.float32)
    assert (_run(ext, [full, empty_inner], x) == 0).all()


@pytest.mark.parametrize("tokens", [1, 17])
def test_out_overwrites_nan_poison(ext, tokens):
    A, B = _matrix(40, 75, torch.float16), _matrix(75, 75, torch.float16, seed=1)
    x = torch.randn(tokens, 75)
    out = torch.full((tokens, 40), float("nan"))
    y = _run(ext, [A, B], x, out)
    assert y.data_ptr() == out.data_ptr() and not out.isnan().any()
    torch.testing.assert_close(out, _run(ext, [A, B], x))


@pytest.mark.parametrize("tokens", [1, 3, 9, 17])
@pytest.mark.parametrize("shape", [(7, 13), (33, 130), (6, 65), (3, 576)])
def test_int8_values_with_row_scales_match_float64(ext, tokens, shape):
    parts, reference = _int8_parts(_matrix(*shape, torch.float32), seed=tokens)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(1))
    y = _run(ext, [parts], x)
    _close(y, x.double() @ reference.T)
    assert (y[:, 0] == 0).all()  # the empty row


@pytest.mark.parametrize("tokens", [1, 5, 17])
def test_chain_mixing_int8_and_float_factors(ext, tokens):
    A_parts, A_ref = _int8_parts(_matrix(70, 45, torch.float32, seed=2, density=0.3), seed=7)
    B = _matrix(45, 131, torch.bfloat16, seed=3)
    x = torch.randn(tokens, 131, generator=torch.Generator().manual_seed(tokens))
    _close(_run(ext, [A_parts, B], x), x.double() @ B.to_dense(torch.float64).T @ A_ref.T)


@pytest.mark.parametrize("code", ["fp8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3, 9, 17])
@pytest.mark.parametrize(("shape", "group_size"), [((7, 13), 64), ((33, 130), 64), ((6, 65), 128), ((3, 576), 256),
                                                   ((5, 300), 128)])
def test_float8_and_int4_codes_match_float64(ext, code, tokens, shape, group_size):
    m = _coded(_matrix(*shape, torch.float32, seed=tokens), code, seed=tokens, group_size=group_size)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(2))
    out = torch.full((tokens, shape[0]), float("nan"))
    y = _run(ext, [m], x, out)
    assert y.data_ptr() == out.data_ptr()
    _close(y, x.double() @ m.to_dense(torch.float64).T)  # to_dense decodes code · scale in fp32: exact
    assert (y[:, 0] == 0).all()  # the empty row


@pytest.mark.parametrize("tokens", [1, 5, 17])
def test_chain_of_int4_and_int8_codes(ext, tokens):
    """The layer ``--values int4 --small-factor-values int8`` writes: A int4 (the larger factor), B int8."""
    A = _coded(_matrix(70, 45, torch.float32, seed=2, density=0.6), "int4", seed=3)
    B_parts, B_ref = _int8_parts(_matrix(45, 131, torch.float32, seed=3, density=0.2), seed=4)
    x = torch.randn(tokens, 131, generator=torch.Generator().manual_seed(tokens))
    _close(_run(ext, [A, B_parts], x), x.double() @ B_ref.T @ A.to_dense(torch.float64).T)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group_size": 100}, "group_size must be 0 or a multiple of 64"),
        ({"scales": torch.ones(9, 2, dtype=torch.float16)}, r"int4 codes need .* scales \[10, 1\]"),
        ({"values": torch.zeros(3, dtype=torch.uint8)}, "row_ptr must run from 0 to nnz"),
        ({"group_size": 0}, "values must be 1-D float16"),
    ],
)
def test_bad_int4_inputs_raise(kernel, change, message):
    m = _coded(_matrix(10, 20, torch.float32), "int4")
    parts = dict(zip(("values", "bitmask", "row_ptr", "scales", "cols", "group_size"), _parts(m)))
    parts.update(change)
    with pytest.raises(RuntimeError, match=message):
        cpu.bitmask_linear(torch.randn(2, 20), [tuple(parts.values())])


@pytest.mark.parametrize("code", ["fp8", "int4"])
def test_coded_bitmask_matmul_takes_the_kernel(kernel, monkeypatch, code):
    m = _coded(_matrix(48, 200, torch.float32), code)
    x = torch.randn(3, 200)
    calls = _count_calls(monkeypatch)
    y = m.matmul(x)
    assert len(calls) == 1
    torch.testing.assert_close(y, PackedMixin.matmul(m, x), **TOL)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int8])
@pytest.mark.parametrize("tokens", [1, 2, 9, 17])
@pytest.mark.parametrize("shape", [(3, 1), (50, 64), (37, 200), (5, 577)])
def test_dense_linear_matches_float64(ext, dtype, tokens, shape):
    gen = torch.Generator().manual_seed(tokens)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        scale = (torch.rand(shape[0], generator=gen) + 0.01).to(torch.bfloat16)
        reference = w.double() * scale.double()[:, None]
    else:
        w, scale = torch.randn(*shape, generator=gen).to(dtype), None
        reference = w.double()
    x = torch.randn(tokens, shape[1], generator=gen)
    out = torch.full((tokens, shape[0]), float("nan"))
    y = ext.dense_linear(x, w, scale, out)
    assert y.data_ptr() == out.data_ptr()
    _close(y, x.double() @ reference.T)


@pytest.mark.parametrize(
    ("weight", "scale", "message"),
    [
        (torch.zeros(4, 8, dtype=torch.int8), None, "int8/float8 codes need float16, bfloat16 or float32 scales"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), r"int8/float8 codes need .* scales \[4\]"),
        (torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, dtype=torch.int32), "int8/float8 codes need"),
        (torch.zeros(4, 8, dtype=torch.float16), torch.ones(4), "scales are only for int8, float8 or int4 codes"),
    ],
)
def test_dense_linear_rejects_bad_scales(kernel, weight, scale, message):
    with pytest.raises(RuntimeError, match=message):
        cpu.dense_linear(torch.randn(1, 8), weight, scale)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 20, dtype=torch.float64)}, "x must be float32"),
        ({"x": torch.randn(2, 21)}, "x must be float32"),
        ({"x": torch.randn(20, 2).T}, "contiguous"),
        ({"values": torch.zeros(1, dtype=torch.int64)}, "values must be 1-D"),
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
        cpu.bitmask_matmul(args["x"], args["values"], args["bitmask"], args["row_ptr"], 20, out=args["out"])


def test_factors_that_do_not_chain_raise(kernel):
    A, B = _matrix(10, 20, torch.float16), _matrix(21, 30, torch.float16)
    with pytest.raises(RuntimeError, match="factor 0 has 20 columns but factor 1 has 21 rows"):
        cpu.bitmask_linear(torch.randn(1, 30), [_parts(A), _parts(B)])


def _count_calls(monkeypatch) -> list:
    calls = []
    real = cpu.bitmask_linear
    monkeypatch.setattr(cpu, "bitmask_linear", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_matmul_takes_the_kernel(kernel, monkeypatch, dtype):
    m = _matrix(48, 96, dtype)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    calls = _count_calls(monkeypatch)
    y = m.matmul(x, torch.float32)
    assert len(calls) == 1 and y.shape == (2, 3, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, PackedMixin.matmul(m, x, torch.float32), **TOL)
    assert m.matmul(x).dtype == torch.bfloat16


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_linear_runs_a_dsf_layer_in_one_call(kernel, monkeypatch, x_dtype):
    A, B = _matrix(40, 30, torch.float16, seed=7), _matrix(30, 64, torch.float16, seed=8)
    bias = torch.randn(40)
    x = torch.randn(1, 5, 64).to(x_dtype)
    calls = _count_calls(monkeypatch)
    y = linear(x, [A, B], bias)
    assert len(calls) == 1 and y.dtype == x_dtype and y.shape == (1, 5, 40)
    reference = _reference([A, B], x) + bias.double()
    scale = reference.abs().max().item()
    atol = 1e-5 if x_dtype == torch.float32 else 2 * torch.finfo(x_dtype).eps  # y is rounded to x's dtype
    torch.testing.assert_close(y.double() / scale, reference / scale, rtol=0, atol=atol)


def test_falls_back_with_a_reason(monkeypatch, caplog):
    A, B = _matrix(8, 16, torch.float16), _matrix(16, 16, torch.float16, seed=1)
    x = torch.randn(2, 16)
    monkeypatch.setattr(cpu, "available", lambda: "not built (test)")
    with caplog.at_level("INFO", logger="dsf_runtime.formats.bitmask"):
        y = linear(x, [A, B])
    torch.testing.assert_close(y, PackedMixin.matmul(A, PackedMixin.matmul(B, x)), **TOL)
    assert "not built (test)" in caplog.text


def test_autograd_takes_the_pure_torch_path(kernel, monkeypatch):
    m = _matrix(8, 16, torch.float32)
    x = torch.randn(2, 16, requires_grad=True)
    calls = _count_calls(monkeypatch)
    m.matmul(x).sum().backward()
    assert not calls and x.grad is not None


def test_many_tokens_take_the_dense_gemm_path(kernel, monkeypatch):
    m = _matrix(48, 96, torch.float16)
    calls = _count_calls(monkeypatch)
    at_limit, above = torch.randn(CPU_KERNEL_MAX_TOKENS, 96), torch.randn(CPU_KERNEL_MAX_TOKENS + 1, 96)
    m.matmul(at_limit)
    assert len(calls) == 1
    y = m.matmul(above)
    assert len(calls) == 1  # unpack + GEMM, the same numbers
    _close(y, _reference([m], above))
