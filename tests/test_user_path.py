"""A new user's path on the real SmolLM2 cut to 2 blocks, each step through its public entry point:
``dsf compress`` (defaults) -> ``dsf export`` (defaults) -> ``dsf run --dense-baseline`` ->
``AutoModelForCausalLM.from_pretrained`` -> ``save_pretrained`` -> reload with both loaders -> ONNX greedy
generation equal to torch's."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import dsf_runtime
from dsf_cli.main import app
from tests.compress.test_pipeline import two_block_smollm2

PROMPT = "It is a truth universally acknowledged"


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    model, tokenizer = two_block_smollm2()
    directory = tmp_path_factory.mktemp("smollm2-2blocks")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_new_user_path(dense_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    compressed, exported = tmp_path / "compressed", tmp_path / "x"
    _invoke("compress", "--model", dense_dir, "--method", "dsf", "--density", "0.5", "--iters", "2",
            "--finalize-iters", "2", "--samples", "4", "--seqlen", "64", "--device", "cpu", "--output", compressed,
            "--no-progress")
    with dsf_runtime.open_compressed(compressed) as ckpt:  # packed by default, not dense fp32
        layouts = {f["layout"] for e in ckpt.layers.values() for f in e["factors"].values()}
        assert layouts <= {"bitmask", "csr", "dense"} and "bitmask" in layouts
        assert ckpt.size_summary()["linear_ratio"] <= 0.65
        assert ckpt.quantized == {"model.embed_tokens.weight": "int8-row"}  # the compact embedding by default

    output = _invoke("export", compressed, "-o", exported)
    assert "x the dense fp16 model" in output and "warning" not in output
    with dsf_runtime.open_compressed(exported) as ckpt:  # the bound on the whole directory
        assert ckpt.quantized == {"model.embed_tokens.weight": "int8-row"} and ckpt.size_summary()["ratio"] <= 0.65
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dsf" and config["dtype"] == "float16"

    output = _invoke("run", "--model", exported, "--prompt", PROMPT, "--max-new-tokens", "4", "--dense-baseline")
    speed, size = re.search(r"([\d.]+)x decode tokens/s", output), re.search(r"([\d.]+)x\s+weight\s+bytes", output)
    assert speed and size and float(speed.group(1)) > 0 and float(size.group(1)) < 1, output

    ids = dsf_runtime.load_tokenizer(exported)(PROMPT, return_tensors="pt").input_ids
    ours = dsf_runtime.from_pretrained(exported)
    hf = AutoModelForCausalLM.from_pretrained(exported)
    with torch.no_grad():
        want = ours(ids).logits
        assert torch.equal(hf(ids).logits, want)
    hf.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(dsf_runtime.from_pretrained(tmp_path / "saved")(ids).logits, want)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, want)

    # ONNX that generates: 20 greedy tokens through ONNX Runtime equal torch's.
    from exporters.onnx_generate import greedy_generate_onnx
    from exporters.onnx_ops import make_session

    _invoke("export", exported, "--onnx", tmp_path / "m.onnx")
    got = greedy_generate_onnx(make_session(tmp_path / "m.onnx"), ids.numpy(), 20)
    with torch.no_grad():
        torch_ids = ours.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert got.tolist() == torch_ids.tolist()
