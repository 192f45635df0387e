"""The input embedding stored as int8 rows (``dsf_runtime.quantized``, docs/format.md "Quantized tensors";
written by ``compress.quantize.quantize_embedding``): the encoding against float64, both loaders and ``save_pretrained`` round trips, the tied head through the CPU kernel,
the dense fallback, the GPU-side dequantization, and the errors for files whose metadata disagrees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsf_runtime import from_pretrained, save_compressed
from dsf_runtime.checkpoint import FILE_METADATA, MANIFEST_NAME, SINGLE_FILE, CheckpointError, open_compressed
from dsf_runtime.convert import _dequantize_embedding
from dsf_runtime.formats.bitmask import CPU_KERNEL_MAX_TOKENS
from dsf_runtime.kernels import cpu
from dsf_runtime.modules import CompactLinear, Int8Embedding
from compress.quantize import quantize_embedding
from dsf_runtime.quantized import dequantize_rows, input_embedding_name
from tests.dsf_runtime.helpers import built_cpu_kernel, compress_randomly, tiny_llama, uncompressed

os.environ["HF_HUB_OFFLINE"] = "1"
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3, 127]])
NAME = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def kernel():
    return built_cpu_kernel()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stored = quantize_embedding({"w": weight}, "w")
    return stored["w"], stored["w_scale"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_embedding_codes_are_within_half_a_step(dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 70, generator=gen) * torch.rand(300, 1, generator=gen) * 5).to(dtype)
    w[3] = 0
    w[4, 9] = -40.0  # a row whose largest magnitude is negative
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == dtype and scale.shape == (300,)
    assert int(q.abs().max()) <= 127 and (q[3] == 0).all() and (scale > 0).all()
    assert q[4, 9] == -127
    error = (q.double() * scale.double()[:, None] - w.double()).abs()
    assert (error <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    torch.testing.assert_close(dequantize_rows(q, scale, torch.float64), q.double() * scale.double()[:, None])


def test_quantize_embedding_keeps_a_tie():
    model = tiny_llama()
    tensors = model.state_dict()
    assert tensors["lm_head.weight"].data_ptr() == tensors[NAME].data_ptr()
    out = quantize_embedding(tensors, input_embedding_name(model))
    assert input_embedding_name(model) == NAME
    assert out[NAME].dtype == torch.int8 and out["lm_head.weight"] is out[NAME]
    assert list(out).index(NAME + "_scale") == list(out).index(NAME) + 1
    assert quantize_embedding(out, NAME)[NAME] is out[NAME], "an int8 tensor is not quantized twice"


def _int8_directory(tmp_path: Path, *, tie: bool = True, name: str = "int8") -> tuple[Path, torch.nn.Module]:
    """A tiny Llama stored as ``dsf compress`` stores it by default (bitmask fp16 factors, fp16 tensors, int8
    embedding). Returns the directory and the fp32 reference whose weights are exactly what the files encode."""
    model = tiny_llama(tie=tie)
    layers = compress_randomly(model, "bitmask", torch.float16)
    model.half().float()
    for layer_name, layer in layers.items():
        with torch.no_grad():
            model.get_submodule(layer_name).weight.copy_(layer.weight())
    tensors = {k: v.half() for k, v in uncompressed(model, layers).items()}
    if tie:
        tensors.pop("lm_head.weight")
    tensors = quantize_embedding(tensors, NAME)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(dequantize_rows(tensors[NAME], tensors[NAME + "_scale"]))
    directory = save_compressed(tmp_path / name, tensors=tensors, layers=layers,
                                config_source=model.config.to_dict(), info={"base_model": "tiny-llama"})
    return directory, model


def test_manifest_lists_the_int8_tensor_and_inspect_counts_it_as_fp16(tmp_path):
    directory, model = _int8_directory(tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["quantized_tensors"] == {NAME: "int8-row"}
    stored = load_file(directory / SINGLE_FILE)
    assert stored[NAME].dtype == torch.int8 and "lm_head.weight" not in stored
    with open_compressed(directory) as ckpt:
        size = ckpt.size_summary()
        vocab, hidden = model.get_input_embeddings().weight.shape
        assert size["other_bytes"] - size["other_fp16_bytes"] == -vocab * hidden + 2 * vocab
        assert torch.equal(ckpt.load_tensors(dequantize=True)[NAME], model.get_input_embeddings().weight.half())


@pytest.mark.parametrize("tokens", [1, CPU_KERNEL_MAX_TOKENS + 3])
def test_both_loaders_compute_the_encoded_model(tmp_path, kernel, tokens):
    from transformers import AutoModelForCausalLM

    directory, reference = _int8_directory(tmp_path)
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        expected = reference.double()(ids).logits
    for model in (from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory)):
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert isinstance(embed, Int8Embedding) and embed.weight.dtype == torch.int8
        assert isinstance(head, CompactLinear) and head.weight is embed.weight
        assert head.weight_scale is embed.weight_scale
        with torch.inference_mode():
            logits = model(ids).logits
        assert logits.dtype == torch.float32
        # fp32 end to end against float64: 131 tokens of attention accumulate ~1e-4 on logits of about 1
        torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=5e-4)


def test_untied_head_stays_dense(tmp_path, kernel):
    directory, reference = _int8_directory(tmp_path, tie=False)
    model = from_pretrained(directory)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert model.get_output_embeddings().weight.dtype == torch.float16
    with torch.inference_mode():
        torch.testing.assert_close(model(IDS).logits.double(), reference.double()(IDS).logits, rtol=1e-4, atol=1e-4)


def test_save_pretrained_round_trips_bit_exact(tmp_path, kernel):
    from transformers import AutoModelForCausalLM

    directory, _ = _int8_directory(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / SINGLE_FILE).keys() == load_file(directory / SINGLE_FILE).keys()
    for name, tensor in load_file(tmp_path / "again" / SINGLE_FILE).items():
        assert torch.equal(tensor, load_file(directory / SINGLE_FILE)[name]), name
    again = from_pretrained(tmp_path / "again")
    with torch.inference_mode():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 6, CPU_KERNEL_MAX_TOKENS + 1])
def test_int8_head_matches_float64(kernel, tokens):
    gen = torch.Generator().manual_seed(tokens)
    q, scale = quantize_rows(torch.randn(9000, 40, generator=gen).half())  # > one row chunk of the GEMM path
    bias = torch.randn(9000, generator=gen)
    x = torch.randn(tokens, 40, generator=gen)
    y = CompactLinear(torch.nn.Parameter(q, requires_grad=False), bias, scale)(x)
    expected = x.double() @ (q.double() * scale.double()[:, None]).T + bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


def test_int8_head_without_kernel_is_exact_too(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: "no kernel in this test")
    q, scale = quantize_rows(torch.randn(50, 16).half())
    x = torch.randn(3, 16)
    y = CompactLinear(torch.nn.Parameter(q, requires_grad=False), None, scale)(x)
    torch.testing.assert_close(y.double(), x.double() @ (q.double() * scale.double()[:, None]).T, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="int8 weight takes row scales"):
        CompactLinear(torch.nn.Parameter(q, requires_grad=False))


def test_gpu_side_dequantizes_once_and_keeps_the_tie(tmp_path):
    directory, reference = _int8_directory(tmp_path)
    model = from_pretrained(directory, float32_on_cpu=False)
    _dequantize_embedding(model)  # what finish_loading does on CUDA
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embed) is torch.nn.Embedding and embed.weight.dtype == torch.float16
    assert type(head) is torch.nn.Linear and head.weight is embed.weight
    assert torch.equal(embed.weight, reference.get_input_embeddings().weight.half())


def test_dense_fallback_holds_the_dequantized_embedding(tmp_path):
    from exporters.dense_fallback import export_dense_fallback

    directory, reference = _int8_directory(tmp_path)
    out = export_dense_fallback(directory, tmp_path / "dense")
    stored = load_file(out / SINGLE_FILE)
    assert stored[NAME].dtype == torch.float16 and NAME + "_scale" not in stored
    assert torch.equal(stored[NAME], reference.get_input_embeddings().weight.half())


def test_export_quantizes_by_default_and_keep_keeps(tmp_path):
    from exporters.config import ExportConfig
    from exporters.layouts import convert_layout

    model = tiny_llama()
    layers = compress_randomly(model, "bitmask", torch.float16)
    tensors = {k: v.half() for k, v in uncompressed(model, layers).items() if k != "lm_head.weight"}
    src = save_compressed(tmp_path / "src", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    convert_layout(src, tmp_path / "int8", ExportConfig())
    convert_layout(src, tmp_path / "keep", ExportConfig(embedding="keep"))
    assert load_file(tmp_path / "int8" / SINGLE_FILE)[NAME].dtype == torch.int8
    assert torch.equal(load_file(tmp_path / "keep" / SINGLE_FILE)[NAME], tensors[NAME])
    convert_layout(tmp_path / "int8", tmp_path / "again", ExportConfig(layout="csr"))
    assert torch.equal(load_file(tmp_path / "again" / SINGLE_FILE)[NAME],
                       load_file(tmp_path / "int8" / SINGLE_FILE)[NAME]), "int8 stays as it is, never re-quantized"
    with pytest.raises(ValueError, match="--embedding 'int4'"):
        ExportConfig(embedding="int4")


def _rewrite(directory: Path, tensors=None, manifest=None) -> None:
    path = directory / SINGLE_FILE
    stored = load_file(path)
    if tensors is not None:
        stored = tensors(stored)
    save_file(stored, str(path), metadata=FILE_METADATA)
    if manifest is not None:
        data = json.loads((directory / MANIFEST_NAME).read_text())
        manifest(data)
        (directory / MANIFEST_NAME).write_text(json.dumps(data))


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _negative_scale(d):
    d[NAME + "_scale"] = -d[NAME + "_scale"]
    return d


def _wrong_scale_shape(d):
    d[NAME + "_scale"] = d[NAME + "_scale"][:-1].contiguous()
    return d


@pytest.mark.parametrize(
    ("tensors", "manifest", "message"),
    [
        (None, lambda m: m.pop("quantized_tensors"), f"'{NAME}' is int8 but the manifest's quantized_tensors does not"),
        (None, lambda m: m.update(quantized_tensors={NAME: "int4-group"}), "must map tensor names to 'int8-row'"),
        (_drop(NAME + "_scale"), None, f"tensor '{NAME}_scale' is missing"),
        (_wrong_scale_shape, None, rf"'{NAME}_scale' is torch.float16 \[127\], expected"),
        (_negative_scale, None, "holds negative scales"),
    ],
)
def test_metadata_that_disagrees_is_an_error(tmp_path, tensors, manifest, message):
    directory, _ = _int8_directory(tmp_path)
    _rewrite(directory, tensors, manifest)
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(directory)
    assert str(directory) in str(info.value)


def test_writer_refuses_an_int8_tensor_without_its_scale(tmp_path):
    model = tiny_llama()
    layers = compress_randomly(model, "bitmask", torch.float16)
    tensors = quantize_embedding({k: v for k, v in uncompressed(model, layers).items() if k != "lm_head.weight"}, NAME)
    tensors.pop(NAME + "_scale")
    with pytest.raises(ValueError, match=f"'{NAME}' is int8 without '{NAME}_scale'"):
        save_compressed(tmp_path / "x", tensors=tensors, layers=layers, config_source=model.config.to_dict())
