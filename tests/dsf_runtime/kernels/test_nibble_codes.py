"""int8 codes with row scales in the ``nibble`` kernel layout (docs/format.md "Quantized values"): the decode
kernel reads the codes and multiplies each row's sum by its scale; every path of ``dispatch.linear`` against a
float64 reference, NaN-poisoned outputs; ``kernel_layout`` keeps int8 codes and decodes the others; files."""

import pytest
import torch

from compress.quantize import Fp8Values, Int4Values, Int8Values, ValueFormat, quantize_rtn
from dsf_runtime import CompressedLayer
from dsf_runtime.checkpoint import open_compressed, save_compressed
from dsf_runtime.formats import DeltaMatrix, NibbleMatrix, kernel_layout, pack
from dsf_runtime.kernels.dispatch import linear
from dsf_runtime.kernels.nibble_matmul import nibble_matmul
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


@pytest.mark.parametrize("tokens", [1, 3, 16, 19])
def test_nibble_matmul_reads_int8_codes(device, tokens):
    gen = torch.Generator().manual_seed(tokens)
    w = balanced_random(37, 83, 5, gen=gen).float()  # odd shapes: not multiples of any block
    w[4] = 0  # an empty row
    packed, reference = _quantized(w)
    k = NibbleMatrix.from_dense(packed.dense_codes(), per_group=5, scales=packed.scales)
    assert k.dtype == torch.int8 and k.compute_dtype == torch.float16
    assert torch.equal(k.to_dense(torch.float64), reference)
    k = k.to(device)
    x = torch.randn(tokens, 83, generator=gen).half()
    bias = torch.randn(37, generator=gen).half()
    out = torch.full((tokens, 37), float("nan"), dtype=torch.float16, device=device)
    y = nibble_matmul(x.to(device), k, bias.to(device), out=out)
    assert rel_err(y, x.double() @ reference.T + bias.double()) <= 1e-2


@pytest.mark.parametrize("path", ["decode", "prefill", "materialize"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_dsf_chain_of_int8_codes_on_every_path(device, path, tokens):
    gen = torch.Generator().manual_seed(7 * tokens)
    mb, rb = _quantized(balanced_random(48, 83, 5, gen=gen))
    ma, ra = _quantized(balanced_random(37, 48, 3, gen=gen))
    ka, kb = kernel_layout(ma), kernel_layout(mb)
    assert isinstance(ka, NibbleMatrix) and ka.dtype == torch.int8 and torch.equal(ka.scales, ma.scales)
    x = torch.randn(tokens, 83, generator=gen).half()
    bias = torch.randn(37, generator=gen).half()
    y = linear(x.to(device), [ka.to(device), kb.to(device)], bias.to(device), path=path)
    assert y.dtype == torch.float16
    assert rel_err(y, (x.double() @ rb.T) @ ra.T + bias.double()) <= 1e-2


def test_kernel_layout_keeps_int8_codes_only():
    gen = torch.Generator().manual_seed(1)
    w = balanced_random(20, 64, 4, gen=gen).float()
    for fmt in (Fp8Values(), Int4Values(64)):
        packed, reference = _quantized(w, fmt)
        k = kernel_layout(packed)  # float8 and int4 codes are decoded into the scales' dtype
        assert not k.quantized and k.dtype == torch.float16
        assert torch.equal(k.to_dense(torch.float64), reference.half().double())
    packed, reference = _quantized(w)
    decoded = kernel_layout(packed, torch.bfloat16)  # another dtype: decoded
    assert not decoded.quantized and decoded.dtype == torch.bfloat16
    unbalanced, _ = _quantized(torch.randn(20, 64, generator=gen) * (torch.rand(20, 64, generator=gen) < 0.3))
    assert isinstance(kernel_layout(unbalanced), DeltaMatrix)  # the delta kernel reads floats: decoded
    with pytest.raises(ValueError, match="'delta' kernels read float values"):
        linear(torch.randn(1, 64), [_FakeCodes()])


class _FakeCodes:
    """A delta-layout stand-in holding codes: the dispatcher must refuse it, not read the codes as values."""

    layout, shape, quantized, compute_dtype = "delta", (20, 64), True, torch.float16
    values = torch.zeros(1, dtype=torch.int8)


def test_nibble_codes_round_trip_through_files(tmp_path):
    """What ``save_pretrained`` writes from a CUDA-loaded model: nibble int8 codes with their scales, read back
    bit for bit."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(2)
    layers = {}
    for name in linear_names(model):
        out, inp = model.get_submodule(name).weight.shape
        ma, _ = _quantized(balanced_random(out, inp, 3, gen=gen))
        mb, _ = _quantized(balanced_random(inp, inp, 4, gen=gen))
        factors = {"A": kernel_layout(ma), "B": kernel_layout(mb)}
        assert all(isinstance(f, NibbleMatrix) and f.quantized for f in factors.values())
        layers[name] = CompressedLayer("dsf", (out, inp), factors, "test", None)
    tensors = {k: v.half() for k, v in uncompressed(model, layers).items() if k != "lm_head.weight"}
    directory = save_compressed(tmp_path / "m", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    with open_compressed(directory) as ckpt:
        for name, layer in layers.items():
            assert ckpt.layers[name]["factors"]["A"]["dtype"] == "int8"
            again = ckpt.load_layer(name)
            for key, f in layer.factors.items():
                stored = again.factors[key].to_tensors()
                assert stored.keys() == f.to_tensors().keys() and "scales" in stored
                assert all(torch.equal(stored[p], t) for p, t in f.to_tensors().items())
