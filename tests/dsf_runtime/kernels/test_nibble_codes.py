"""Codes in the ``nibble`` kernel layout (docs/format.md "Quantized values"): int8 and float8 codes with row scales
(the decode kernel multiplies each row's sum by its scale) and int4 codes with column-group scales (each code times
its group's scale in registers); every path of ``dispatch.linear`` against a float64 reference, NaN-poisoned
outputs; ``kernel_layout`` keeps the codes of balanced factors; the unpack kernel; files bit for bit; bad tensors
named."""

import pytest
import torch

from compress.quantize import Fp8Values, Int4Values, Int8Values, ValueFormat, quantize_rtn
from dsf_runtime import CompressedLayer
from dsf_runtime.checkpoint import open_compressed, save_compressed
from dsf_runtime.formats import DeltaMatrix, FormatError, NibbleMatrix, kernel_layout, pack
from dsf_runtime.kernels.dispatch import linear
from dsf_runtime.kernels.nibble_matmul import nibble_matmul
from dsf_runtime.kernels.nibble_unpack import nibble_unpack
from tests.dsf_runtime.helpers import linear_names, tiny_llama, uncompressed
from tests.dsf_runtime.kernels.conftest import balanced_random, rel_err


def _quantized(w: torch.Tensor, fmt: ValueFormat = Int8Values(), layout: str = "bitmask"):
    """``w``'s non-zeros as codes of ``fmt`` packed in ``layout``, and the float64 matrix they encode."""
    q = quantize_rtn(w.float(), fmt)
    codes = torch.zeros(w.shape, dtype=torch.int8 if fmt.name == "int4" else q.codes.dtype)
    codes[q.mask] = fmt.unpack(q.codes, q.mask).to(codes.dtype)
    options = {"scales": q.scales} if fmt.per_row else {
        "scales": q.scales.reshape(w.shape[0], -1), "group_size": fmt.group_size}
    return pack(codes, layout, **options), q.dequantize().double()


FORMATS = [Int8Values(), Fp8Values(), Int4Values(64)]
IDS = ["int8", "fp8", "int4"]
CODE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
              "int4": torch.uint8}  # stored dtype by format name and by manifest name


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("tokens", [1, 3, 16, 19])
def test_nibble_matmul_reads_codes(device, tokens, fmt):
    gen = torch.Generator().manual_seed(tokens)
    w = balanced_random(37, 150, 5, gen=gen).float()  # odd shapes: not multiples of any block; 3 int4 groups
    w[4] = 0  # an empty row
    w[5, :64] = 0  # an empty int4 group
    packed, reference = _quantized(w, fmt)
    k = NibbleMatrix.from_dense(packed.dense_codes(), per_group=5, **packed.code_options())
    assert k.dtype == CODE_DTYPE[fmt.name] and k.compute_dtype == torch.float16 and k.quantized
    assert torch.equal(k.to_dense(torch.float64), reference)
    assert k.nnz == packed.nnz and torch.equal(k.dense_codes(), packed.dense_codes())
    k = k.to(device)
    x = torch.randn(tokens, 150, generator=gen).half()
    bias = torch.randn(37, generator=gen).half()
    out = torch.full((tokens, 37), float("nan"), dtype=torch.float16, device=device)
    y = nibble_matmul(x.to(device), k, bias.to(device), out=out)
    assert rel_err(y, x.double() @ reference.T + bias.double()) <= 1e-2


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("cfg", [
    {"BN": 1, "BLOCK_R": 16, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},  # S % BLOCK_S != 0: masked steps
    {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": True, "CG": True},
    {"BN": 4, "BLOCK_R": 2, "BLOCK_S": 128, "num_warps": 4, "num_stages": 1, "XF32": True},
], ids=["masked", "prefetch", "packed"])
def test_codes_under_every_config(device, cfg, fmt):
    gen = torch.Generator().manual_seed(6)
    packed, reference = _quantized(balanced_random(20, 201, 4, 10, gen=gen).float(), fmt)  # G = 10
    k = NibbleMatrix.from_dense(packed.dense_codes(), group=10, **packed.code_options()).to(device)
    x = torch.randn(3, 201, generator=gen).half()
    out = torch.full((3, 20), float("nan"), dtype=torch.float16, device=device)
    y = nibble_matmul(x.to(device), k, config=cfg, out=out)
    assert rel_err(y, x.double() @ reference.T) <= 1e-2


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_nibble_unpack_decodes_codes(device, fmt):
    gen = torch.Generator().manual_seed(3)
    packed, reference = _quantized(balanced_random(21, 200, 6, gen=gen).float(), fmt)
    k = NibbleMatrix.from_dense(packed.dense_codes(), **packed.code_options()).to(device)
    out = torch.full((21 - 5, 200), float("nan"), dtype=torch.float32, device=device)
    got = nibble_unpack(k, out, row_start=5)
    assert torch.equal(got.cpu().double(), reference[5:])  # code · scale is exact in fp32


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("path", ["decode", "prefill", "materialize"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_dsf_chain_of_codes_on_every_path(device, path, tokens, fmt):
    gen = torch.Generator().manual_seed(7 * tokens)
    mb, rb = _quantized(balanced_random(48, 83, 5, gen=gen), fmt)
    ma, ra = _quantized(balanced_random(37, 48, 3, gen=gen), Int8Values())  # factors in different formats
    ka, kb = kernel_layout(ma), kernel_layout(mb)
    for k, m in ((ka, ma), (kb, mb)):
        assert isinstance(k, NibbleMatrix) and k.dtype == CODE_DTYPE[m.value_format]
        assert torch.equal(k.scales, m.scales) and k.group_size == m.group_size
    x = torch.randn(tokens, 83, generator=gen).half()
    bias = torch.randn(37, generator=gen).half()
    y = linear(x.to(device), [ka.to(device), kb.to(device)], bias.to(device), path=path)
    assert y.dtype == torch.float16
    assert rel_err(y, (x.double() @ rb.T) @ ra.T + bias.double()) <= 1e-2


def test_kernel_layout_decodes_codes_it_cannot_keep():
    gen = torch.Generator().manual_seed(1)
    w = balanced_random(20, 64, 4, gen=gen).float()
    packed, reference = _quantized(w)
    decoded = kernel_layout(packed, torch.bfloat16)  # another dtype: decoded
    assert not decoded.quantized and decoded.dtype == torch.bfloat16
    for fmt in FORMATS:
        unbalanced, _ = _quantized(torch.randn(20, 64, generator=gen) * (torch.rand(20, 64, generator=gen) < 0.3), fmt)
        k = kernel_layout(unbalanced)
        assert isinstance(k, DeltaMatrix) and not k.quantized  # the delta kernel reads floats: decoded
    with pytest.raises(ValueError, match="'delta' kernels read float values"):
        linear(torch.randn(1, 64), [_FakeCodes()])


def test_float8_negative_zero_is_not_stored():
    """-0.0 float8 codes (bits 0x80) count as zero: the group keeps its non-zeros first, as validate requires."""
    codes = torch.zeros(16, 32, dtype=torch.float8_e4m3fn)
    codes[0, 0] = -0.0
    codes[0, 1] = 3.0
    k = NibbleMatrix.from_dense(codes, scales=torch.ones(16, dtype=torch.float16))
    k.validate("w")
    assert k.nnz == 1 and k.per_group == 1
    assert k.to_dense(torch.float32)[0, :2].tolist() == [0.0, 3.0]


def test_float8_codes_are_decoded_where_triton_lacks_the_type(monkeypatch):
    packed, reference = _quantized(balanced_random(20, 64, 4, gen=torch.Generator().manual_seed(2)).float(),
                                   Fp8Values())
    import dsf_runtime.formats as formats

    monkeypatch.setattr(formats, "_float8_kernels", lambda device: False)  # e.g. an A100 (compute capability 8.0)
    k = kernel_layout(packed)
    assert not k.quantized and k.dtype == torch.float16
    assert torch.equal(k.to_dense(torch.float64), reference.half().double())
    int8, _ = _quantized(balanced_random(20, 64, 4, gen=torch.Generator().manual_seed(3)).float())
    assert kernel_layout(int8).quantized  # other codes stay codes


def test_bad_int4_nibble_tensors_are_named():
    gen = torch.Generator().manual_seed(5)
    packed, _ = _quantized(balanced_random(16, 128, 4, gen=gen).float(), Int4Values(64))
    k = NibbleMatrix.from_dense(packed.dense_codes(), **packed.code_options())
    k.validate("w")
    bad = k.values.clone()
    bad[0, 0] = (bad[0, 0] & 0xF0) | 8  # the code -8
    with pytest.raises(FormatError, match=r"w\.values.*int4 code -8"):
        NibbleMatrix(bad, k.index, k.shape, k.group, k.per_group, k.scales, 64).validate("w")
    with pytest.raises(FormatError, match=r"w\.scales"):
        NibbleMatrix(k.values, k.index, k.shape, k.group, k.per_group, k.scales[:, :1], 64).validate("w")
    with pytest.raises(FormatError, match=r"w\.values.*expected uint8"):
        NibbleMatrix(k.values.view(torch.int8), k.index, k.shape, k.group, k.per_group, k.scales, 64).validate("w")


class _FakeCodes:
    """A delta-layout stand-in holding codes: the dispatcher must refuse it, not read the codes as values."""

    layout, shape, quantized, compute_dtype = "delta", (20, 64), True, torch.float16
    values = torch.zeros(1, dtype=torch.int8)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_nibble_codes_round_trip_through_files(tmp_path, fmt):
    """What ``save_pretrained`` writes from a CUDA-loaded model: nibble codes with their scales, read back bit for
    bit (factor A in int8, B in the format under test)."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(2)
    layers = {}
    for name in linear_names(model):
        out, inp = model.get_submodule(name).weight.shape
        ma, _ = _quantized(balanced_random(out, inp, 3, gen=gen))
        mb, _ = _quantized(balanced_random(inp, inp, 4, gen=gen), fmt)
        factors = {"A": kernel_layout(ma), "B": kernel_layout(mb)}
        assert all(isinstance(f, NibbleMatrix) and f.quantized for f in factors.values())
        layers[name] = CompressedLayer("dsf", (out, inp), factors, "test", None)
    tensors = {k: v.half() for k, v in uncompressed(model, layers).items() if k != "lm_head.weight"}
    directory = save_compressed(tmp_path / "m", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    with open_compressed(directory) as ckpt:
        for name, layer in layers.items():
            assert ckpt.layers[name]["factors"]["A"]["dtype"] == "int8"
            assert ckpt.layers[name]["factors"]["B"]["dtype"] == layers[name].factors["B"].value_format
            again = ckpt.load_layer(name)
            for key, f in layer.factors.items():
                stored = again.factors[key].to_tensors()
                assert stored.keys() == f.to_tensors().keys() and "scales" in stored
                assert all(torch.equal(stored[p], t) for p, t in f.to_tensors().items())
