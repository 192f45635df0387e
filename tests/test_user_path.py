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
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
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

    output = _invoke("export", compressed, "-o", exported)
    assert "x the dense fp16 model" in output and "warning" not in output
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dsf" and config["dtype"] == "float16"

    output = _invoke("run", "--model", exported, "--prompt", PROMPT, "--max-new-tokens", "4", "--dense-baseline")
    ratio = re.search(r"compressed vs dense: ([\d.]+)x decode tokens/s, ([\d.]+)x weight bytes", output)
    assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(2)) < 1, output

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
