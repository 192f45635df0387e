"""16-bit weights computing in fp32 on the CPU (``convert.float32_activations_on_cpu``, ``CompactLinear``), the
chunked finite check and the bitmask popcount of validation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from dsf_runtime import from_pretrained, save_compressed
from dsf_runtime.checkpoint import all_finite
from dsf_runtime.formats.bitmask import CPU_KERNEL_MAX_TOKENS, popcount_rows
from dsf_runtime.kernels import cpu
from dsf_runtime.modules import CompactLinear
from tests.dsf_runtime.helpers import built_cpu_kernel, compress_randomly, tiny_llama, uncompressed

os.environ["HF_HUB_OFFLINE"] = "1"
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3]])


@pytest.fixture(scope="module")
def kernel():
    return built_cpu_kernel()


def _half_directory(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny tied Llama stored the way ``dsf compress`` stores by default: bitmask factors and every other
    floating tensor in fp16. Returns the directory and the model (its weights the exact products, fp32)."""
    model = tiny_llama()
    layers = compress_randomly(model, "bitmask", torch.float16)
    model.half().float()  # the reference holds exactly the fp16-rounded weights
    for layer_name, layer in layers.items():
        with torch.no_grad():
            model.get_submodule(layer_name).weight.copy_(layer.weight())
    tensors = {k: v.half() for k, v in uncompressed(model, layers).items() if k != "lm_head.weight"}
    directory = save_compressed(tmp_path / "fp16", tensors=tensors, layers=layers, config_source=model.config.to_dict(),
                                info={"base_model": "tiny-llama"})
    return directory, model


@pytest.mark.parametrize("tokens", [1, 5, CPU_KERNEL_MAX_TOKENS + 3])
def test_half_weight_linear_matches_float64(kernel, tokens):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.nn.Parameter(torch.randn(300, 70, generator=gen).half(), requires_grad=False)
    bias = torch.nn.Parameter(torch.randn(300, generator=gen).half(), requires_grad=False)
    x = torch.randn(2, tokens, 70, generator=gen)
    y = CompactLinear(weight, bias)(x)
    reference = x.double() @ weight.double().T + bias.double()
    assert y.dtype == torch.float32 and y.shape == (2, tokens, 300)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4)


def test_half_weight_linear_without_kernel_runs_in_the_weight_dtype(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "available", lambda: "no kernel in this test")
    weight = torch.nn.Parameter(torch.randn(40, 16).half(), requires_grad=False)
    x = torch.randn(3, 16)
    with caplog.at_level(logging.INFO, logger="dsf_runtime.modules"):
        y = CompactLinear(weight)(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.half().double() @ weight.double().T, rtol=2e-3, atol=2e-3)
    assert "no kernel in this test" in caplog.text


def test_fp16_checkpoint_computes_in_fp32_on_the_cpu(tmp_path, kernel):
    directory, reference = _half_directory(tmp_path)
    model = from_pretrained(directory)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.weight.dtype == torch.float16, "the stored 16-bit weights stay 16-bit"
    assert isinstance(head, CompactLinear) and head.weight is embed.weight, "the tied head stays tied"
    with torch.inference_mode():
        logits = model(IDS).logits
        expected = reference.double()(IDS).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_fp16_checkpoint_round_trips_with_its_dtypes(tmp_path, kernel):
    directory, _ = _half_directory(tmp_path)
    model = from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.inference_mode():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_all_finite_checks_every_chunk(monkeypatch):
    import dsf_runtime.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_FINITE_CHUNK", 7)
    t = torch.zeros(10, 5, dtype=torch.float16)
    assert all_finite(t)
    t[9, 4] = float("inf")
    assert not all_finite(t)
    t[9, 4] = float("nan")
    assert not all_finite(t)


def test_popcount_rows_counts_every_bit():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 256, (40, 13), generator=gen, dtype=torch.uint8)
    bits[0] = 255
    bits[1] = 0
    expected = torch.tensor([sum(bin(int(b)).count("1") for b in row) for row in bits], dtype=torch.int32)
    assert torch.equal(popcount_rows(bits), expected)
