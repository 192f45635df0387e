"""Quantized factor values (docs/format.md "Quantized values"): int8 / float8 codes with one scale per row and int4
codes with one scale per group of columns in the ``dense``, ``csr`` and ``bitmask`` layouts, against float64; files round-tripped bit-exact through both loaders and
the exporter; and the errors for tensors or manifests that disagree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.quantize import Fp8Values, Int4Values, Int8Values, quantize_rtn
from dsf_runtime import CompressedLayer, from_pretrained, save_compressed
from dsf_runtime.checkpoint import FILE_METADATA, MANIFEST_NAME, SINGLE_FILE, CheckpointError, open_compressed
from dsf_runtime.formats import FormatError, from_meta, kernel_layout, pack
from tests.dsf_runtime.helpers import linear_names, tiny_llama, uncompressed

os.environ["HF_HUB_OFFLINE"] = "1"
FORMATS = {"int8": Int8Values(), "fp8": Fp8Values(), "int4": Int4Values(64)}
MANIFEST_DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn", "int4": "int4"}
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3, 127]])


def _codes(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Codes ``[rows, cols]`` (int4 as int8), the ``pack`` keywords of their fp16 scales (int4: ``[rows, groups]``
    and ``group_size``) and the float64 matrix they encode, for ``weight``'s non-zeros."""
    fmt = FORMATS[name]
    quantized = quantize_rtn(weight, fmt)
    dense = torch.zeros(weight.shape)
    dense[quantized.mask] = fmt.unpack(quantized.codes, quantized.mask).float()
    if fmt.per_row:
        return dense.to(quantized.codes.dtype), {"scales": quantized.scales}, quantized.dequantize().double()
    options = {"scales": quantized.scales.reshape(weight.shape[0], -1), "group_size": fmt.group_size}
    return dense.to(torch.int8), options, quantized.dequantize().double()


def _sparse(rows: int, cols: int, seed: int = 0, density: float = 0.4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[torch.rand(rows, cols, generator=gen) >= density] = 0
    w[0] = 0  # an empty row
    return w


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("layout", ["dense", "csr", "bitmask", "auto"])
@pytest.mark.parametrize("tokens", [1, 3, 140])
def test_codes_decode_and_multiply_like_float64(name, layout, tokens):
    codes, options, reference = _codes(_sparse(37, 70, seed=tokens), name)
    packed = pack(codes, layout, **options)
    packed.validate("w")
    assert packed.quantized and packed.value_format == MANIFEST_DTYPES[name]
    assert packed.compute_dtype == torch.float16
    assert torch.equal(packed.to_dense(torch.float64), reference)
    assert torch.equal(packed.dense_codes(), codes)
    again = from_meta(packed.to_tensors("w"), "w", packed.meta())
    assert set(again.to_tensors()) == set(packed.to_tensors()) and "scales" in again.stored_parts
    for key, tensor in packed.to_tensors().items():
        assert torch.equal(again.to_tensors()[key].view(torch.uint8) if tensor.itemsize == 1 else
                           again.to_tensors()[key], tensor.view(torch.uint8) if tensor.itemsize == 1 else tensor)
    x = torch.randn(tokens, 70, generator=torch.Generator().manual_seed(1))
    y = packed.matmul(x)  # bitmask int8: the compiled CPU kernel when built; the others: pure torch
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ reference.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cast_decodes_and_gpu_layout_decodes(name):
    codes, options, reference = _codes(_sparse(20, 148), name)
    packed = pack(codes, "bitmask", **options)
    cast = packed.to(dtype=torch.float32)
    assert not cast.quantized and torch.equal(cast.to_dense(torch.float64), reference)
    kernel = kernel_layout(packed)
    assert kernel.dtype == torch.float16 and torch.equal(kernel.to_dense(torch.float64), reference.half().double())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("w.scales"), r"'w.scales' is missing; int8 values need one scale per row"),
        (lambda t: t.update({"w.scales": t["w.scales"][:-1]}), r"'w.scales' has shape \[19\], expected \[20\]"),
        (lambda t: t.update({"w.scales": -t["w.scales"]}), "'w.scales' holds a negative, NaN or infinite scale"),
        (lambda t: t.update({"w.scales": t["w.scales"].int()}), "'w.scales' is int32, expected"),
        (lambda t: t.update({"w.values": t["w.values"].half()}), "'w.scales' is stored next to float16 values"),
    ],
)
def test_bad_scales_name_the_tensor(change, message):
    codes, options, _ = _codes(_sparse(20, 48), "int8")
    tensors = pack(codes, "csr", **options).to_tensors("w")
    change(tensors)
    with pytest.raises(FormatError, match=message):
        from_meta(tensors, "w", pack(codes, "csr", **options).meta())


def _set_nibble(t: dict, value: int) -> None:
    """Set the first code of ``w.values`` to the raw nibble ``value``."""
    t["w.values"] = t["w.values"].clone()
    t["w.values"][0] = (t["w.values"][0] & 0xF0) | value


@pytest.mark.parametrize("layout", ["csr", "bitmask", "dense"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("w.scales"), r"'w.scales' is missing; int4 values need one scale per group"),
        (lambda t: t.update({"w.scales": t["w.scales"][:, :1]}), r"'w.scales' has shape \[20, 1\], expected \[20, 3\]"),
        (lambda t: t.update({"w.scales": t["w.scales"].flatten()}), r"'w.scales' has shape \[60\], expected \[20, 3\]"),
        (lambda t: t.update({"w.scales": t["w.scales"] * float("nan")}), "'w.scales' holds a negative, NaN or infinite"),
        (lambda t: t.update({"w.values": t["w.values"][:-1]}), r"'w.values' has shape \[\d+\], expected \[\d+\]"),
        (lambda t: t.update({"w.values": t["w.values"].view(torch.int8)}), "'w.values' is int8, expected uint8"),
        (lambda t: _set_nibble(t, 8), "'w.values' holds the int4 code -8 in byte 0"),
    ],
)
def test_bad_int4_tensors_name_the_tensor(layout, change, message):
    codes, options, _ = _codes(_sparse(20, 148), "int4")
    packed = pack(codes, layout, **options)
    tensors = packed.to_tensors("w")
    change(tensors)
    with pytest.raises(FormatError, match=message):
        from_meta(tensors, "w", packed.meta())


def test_int4_group_size_is_checked():
    codes, options, _ = _codes(_sparse(20, 148), "int4")
    with pytest.raises(ValueError, match=r"int4 group_size must be one of \(64, 128, 256\), got 32"):
        pack(codes, "csr", scales=options["scales"], group_size=32)
    with pytest.raises(ValueError, match=r"int4 codes must lie in \[-7, 7\]"):
        pack(codes * 2, "csr", **options)
    overflow = codes.clone()
    overflow[1, 0] = -128  # abs(-128) overflows in int8: still refused
    with pytest.raises(ValueError, match=r"int4 codes must lie in \[-7, 7\]"):
        pack(overflow, "bitmask", **options)
    packed = pack(codes, "csr", **options)
    with pytest.raises(FormatError, match="'w.scales' belongs to int4 codes with group_size 100"):
        from_meta(packed.to_tensors("w"), "w", packed.meta() | {"group_size": 100})


def test_export_keeps_each_factors_own_encoding(tmp_path):
    """A layer whose factors use different encodings (int4 g64, int8, float) converts between layouts bit for bit."""
    from exporters.config import ExportConfig
    from exporters.layouts import convert_layer

    a, oa, ra = _codes(_sparse(24, 200, seed=1), "int4")
    b, ob, rb = _codes(_sparse(200, 130, seed=2), "int8")
    factors = {"A": pack(a, "bitmask", **oa), "B": pack(b, "bitmask", **ob)}
    layer = CompressedLayer("dsf", (24, 130), factors, "test", None)
    for layout in ("csr", "dense", "auto"):
        out = convert_layer(layer, ExportConfig(layout=layout))
        assert out.factors["A"].value_format == "int4" and out.factors["A"].group_size == 64
        assert out.factors["B"].value_format == "int8"
        assert torch.equal(out.factors["A"].to_dense(torch.float64), ra)
        assert torch.equal(out.factors["B"].to_dense(torch.float64), rb)
    mixed = CompressedLayer("dsf", (24, 130), {"A": factors["A"], "B": pack(rb.half(), "bitmask")}, "test", None)
    out = convert_layer(mixed, ExportConfig(layout="csr"))
    assert out.factors["A"].quantized and out.factors["B"].dtype == torch.float16


def test_layouts_without_codes_refuse_them():
    for name in ("int8", "int4"):
        codes, options, _ = _codes(_sparse(20, 48), name)
        with pytest.raises(ValueError, match="layout 'nibble' has no quantized values"):
            pack(codes, "nibble", **options)


def _directory(tmp_path: Path, name: str) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama whose linears are DSF factors with ``name`` codes (bitmask), stored with fp16 tensors; and its
    fp32 reference with exactly the decoded weights."""
    model = tiny_llama()
    layers = {}
    for i, layer_name in enumerate(linear_names(model)):
        linear = model.get_submodule(layer_name)
        out, inp = linear.weight.shape
        # factors of magnitude ~0.15, so that the product is O(1/30) like a trained weight, not a chaotic network
        a, oa, ra = _codes(_sparse(out, inp, seed=2 * i, density=0.2) * 0.15, name)
        b, ob, rb = _codes(_sparse(inp, inp, seed=2 * i + 1, density=0.2) * 0.15, name)
        layers[layer_name] = CompressedLayer.from_dense(
            "dsf", {"A": a, "B": b}, scales={"A": oa["scales"], "B": ob["scales"]}, group_size=oa.get("group_size"),
            method="test", layout="auto")
        with torch.no_grad():
            linear.weight.copy_((ra @ rb).float())
    model.half().float()
    tensors = {k: v.half() for k, v in uncompressed(model, layers).items() if k != "lm_head.weight"}
    for layer_name, layer in layers.items():  # the reference: exactly the decoded product
        with torch.no_grad():
            model.get_submodule(layer_name).weight.copy_(layer.weight())
    directory = save_compressed(tmp_path / name, tensors=tensors, layers=layers, config_source=model.config.to_dict())
    return directory, model


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_both_loaders_run_the_codes_and_save_pretrained_round_trips(tmp_path, name):
    from transformers import AutoModelForCausalLM

    directory, reference = _directory(tmp_path, name)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    factor = next(iter(manifest["layers"].values()))["factors"]["A"]
    assert factor["dtype"] == MANIFEST_DTYPES[name] and factor["scale_dtype"] == "float16"
    assert factor.get("group_size") == (64 if name == "int4" else None)
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["value_dtypes"] == [factor["dtype"]]
    with torch.inference_mode():
        expected = reference.double()(IDS).logits
    for model in (from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory)):
        with torch.inference_mode():
            torch.testing.assert_close(model(IDS).logits.double(), expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "again")
    stored, again = load_file(directory / SINGLE_FILE), load_file(tmp_path / "again" / SINGLE_FILE)
    assert stored.keys() == again.keys()
    for key, tensor in stored.items():
        assert torch.equal(again[key].view(torch.uint8), tensor.view(torch.uint8)), key


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_export_keeps_codes_bit_exact_and_decodes_where_asked(tmp_path, name):
    from exporters.config import ExportConfig
    from exporters.layouts import convert_layout

    directory, _ = _directory(tmp_path, name)
    csr = convert_layout(directory, tmp_path / "csr", ExportConfig(layout="csr", embedding="keep"))
    back = convert_layout(csr, tmp_path / "back", ExportConfig(layout="auto", embedding="keep"))
    first, last = load_file(directory / SINGLE_FILE), load_file(back / SINGLE_FILE)
    assert first.keys() == last.keys()
    for key, tensor in first.items():
        assert torch.equal(last[key].view(torch.uint8), tensor.view(torch.uint8)), key
    with open_compressed(csr) as ckpt:
        assert {f["layout"] for e in ckpt.layers.values() for f in e["factors"].values()} == {"csr"}
    decoded = convert_layout(directory, tmp_path / "fp16", ExportConfig(layout="bitmask", dtype="float16"))
    nibble = convert_layout(directory, tmp_path / "nibble", ExportConfig(layout="nibble"))
    with open_compressed(directory) as src, open_compressed(decoded) as a, open_compressed(nibble) as b:
        for fqn in src.layers:
            want = src.load_layer(fqn).to(dtype=torch.float16).weight()  # decoded, then rounded to fp16
            assert a.manifest["layers"][fqn]["factors"]["A"]["dtype"] == "float16"
            assert torch.equal(a.load_layer(fqn).weight(), want) and torch.equal(b.load_layer(fqn).weight(), want)


def _rewrite_manifest(directory: Path, change) -> None:
    data = json.loads((directory / MANIFEST_NAME).read_text())
    change(next(iter(data["layers"].values()))["factors"]["A"])
    (directory / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.update(layout="delta"), "holds int8 codes in layout 'delta'"),
        (lambda f: f.pop("scale_dtype"), "has scale_dtype None, expected one of"),
        (lambda f: f.update(scale_dtype="bfloat16"), "has scale_dtype 'float16' but the manifest says 'bfloat16'"),
        (lambda f: f.update(dtype="int2"), "has dtype 'int2', expected one of"),
        (lambda f: f.update(dtype="int4"), "has dtype 'int4' and group_size None; int4 codes need a group_size"),
        (lambda f: f.update(dtype="int4", group_size=64), r"value_dtypes' is \['int8'\], expected \['int4', 'int8'\]"),
        (lambda f: f.update(group_size=64), "has dtype 'int8' and group_size 64; int4 codes need"),
    ],
)
def test_manifest_that_disagrees_is_an_error(tmp_path, change, message):
    directory, _ = _directory(tmp_path, "int8")
    _rewrite_manifest(directory, change)
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(directory)
    assert str(directory) in str(info.value)


def test_a_missing_scales_tensor_is_named(tmp_path):
    directory, _ = _directory(tmp_path, "int8")
    tensors = load_file(directory / SINGLE_FILE)
    name = next(k for k in tensors if k.endswith(".A.scales"))
    save_file({k: v for k, v in tensors.items() if k != name}, str(directory / SINGLE_FILE), metadata=FILE_METADATA)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        open_compressed(directory)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_onnx_export_decodes_the_codes(tmp_path, name):
    from exporters.onnx_export import export_onnx

    directory, _ = _directory(tmp_path, name)
    out = export_onnx(directory, tmp_path / "m.onnx", verify=True)  # verify: ONNX Runtime against torch
    assert out.exists() and (tmp_path / "m.onnx.data").exists()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_dense_fallback_decodes_the_codes(tmp_path, name):
    from exporters.dense_fallback import export_dense_fallback

    directory, _ = _directory(tmp_path, name)
    out = export_dense_fallback(directory, tmp_path / "dense")
    stored = load_file(out / SINGLE_FILE)
    with open_compressed(directory) as ckpt:
        for fqn in ckpt.layers:
            weight = stored[f"{fqn}.weight"]
            assert weight.dtype == torch.float16, fqn  # the scales' dtype, not the codes'
            assert torch.equal(weight, ckpt.load_layer(fqn).weight(torch.float16)), fqn
