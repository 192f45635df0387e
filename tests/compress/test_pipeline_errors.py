"""Bad input fails early with a message naming what is wrong and how to fix it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compress.api import CompressConfig, ConfigError, compress_model
from compress.architectures import ARCHITECTURES, architecture_for, block_groups
from compress.output import prepare_output
from compress.solvers import METHODS

SUPPORTED = "llama, mistral, opt, qwen2, qwen3"


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        compress_model(CompressConfig(model=str(missing)), tmp_path / "out")
    assert str(info.value) == (
        f"model directory '{missing}' does not exist; pass a Hugging Face model directory "
        "or 'smollm2-135m' (the packaged SmolLM2)"
    )
    (tmp_path / "compressed").mkdir()
    (tmp_path / "compressed" / "config.json").write_text("{}")
    (tmp_path / "compressed" / "dsf_manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model directory '.*compressed' is already compressed \(dsf_manifest.json\)"):
        compress_model(CompressConfig(model=str(tmp_path / "compressed")), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model directory '.*empty' has no config.json"):
        compress_model(CompressConfig(model=str(tmp_path / "empty")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_calibration_text_shorter_than_one_sample(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("It is a truth universally acknowledged.", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        compress_model(CompressConfig(calibration=str(text), seqlen=512), tmp_path / "out")
    assert str(info.value).startswith(f"calibration text '{text}' has ")
    assert str(info.value).endswith(
        " tokens, fewer than one sample needs (seqlen + 1 = 513); use a smaller seqlen or a longer text"
    )
    with pytest.raises(FileNotFoundError, match="text 'no-such-novel': no such file, and not a packaged text"):
        compress_model(CompressConfig(calibration="no-such-novel"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture():
    config = SimpleNamespace(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError) as info:
        architecture_for(config)
    assert str(info.value) == (
        f"unsupported architecture: model_type 'gpt2' (GPT2LMHeadModel); supported model types: {SUPPORTED}"
    )
    assert ", ".join(sorted(ARCHITECTURES)) == SUPPORTED
    mixed = SimpleNamespace(model_type="qwen2", layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match=r"model_type 'qwen2' mixes attention layer types"):
        architecture_for(mixed)


def test_unsupported_architecture_through_compress_model(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from compress.assets import smollm2_dir

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152, n_positions=128))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    with pytest.raises(ValueError, match=r"^unsupported architecture: model_type 'gpt2'; supported model types"):
        compress_model(CompressConfig(samples=2, seqlen=16), tmp_path / "out", model=model, tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_unsupported_layer_type():
    from transformers.pytorch_utils import Conv1D

    block = nn.Module()
    block.self_attn = nn.Module()
    block.mlp = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(block.self_attn, name, nn.Linear(8, 8))
    block.mlp.gate_proj, block.mlp.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
    block.self_attn.q_proj = Conv1D(8, 8)  # e.g. GPT-2's linear type
    del block.mlp.up_proj
    block.mlp.down_proj = nn.Linear(16, 8)
    with pytest.raises(ValueError) as info:
        block_groups(block, ARCHITECTURES["llama"], "model.layers.0")
    assert str(info.value) == (
        "unsupported layer type: model.layers.0.self_attn.q_proj is Conv1D, expected torch.nn.Linear; "
        "model.layers.0.mlp.up_proj is missing"
    )


@pytest.mark.parametrize("density", [1.5, 0.0, -0.1])
def test_density_out_of_range_names_the_field(density):
    with pytest.raises(ConfigError) as info:
        CompressConfig(density=density)
    assert info.value.field == "density"
    assert info.value.message == (
        f"density must be in (0, 1], got {density!r}; pass the fraction of weights to keep (0.5 keeps half)"
    )


def test_other_config_errors():
    with pytest.raises(ConfigError) as info:
        CompressConfig(method="magnitude", solver_options={"iters": 3})
    assert info.value.field == "solver_options"
    assert "unknown option(s) 'iters' for method 'magnitude'" in info.value.message
    with pytest.raises(ConfigError) as info:
        CompressConfig(method="obs")
    assert info.value.field == "method"
    assert info.value.message == f"unknown method 'obs'; valid methods: {', '.join(METHODS)}"
    with pytest.raises(ConfigError, match=r"^samples: must be ≥ 1, got 0$"):
        CompressConfig(samples=0)
    with pytest.raises(ConfigError, match=r"^dtype: must be one of float32, bfloat16, float16, got 'fp8'$"):
        CompressConfig(dtype="fp8")
    if not torch.cuda.is_available():
        from compress.api import resolve_device

        with pytest.raises(ConfigError, match="'cuda': CUDA requested but torch sees no CUDA device; use --device cpu"):
            resolve_device("cuda")


def test_output_directory_rules(tmp_path):
    fingerprint = {"method": "dsf", "density": 0.5, "samples": 64}
    partial = prepare_output(tmp_path / "run", fingerprint, resume=False, overwrite=False)
    assert json.loads((partial.path / "state.json").read_text())["config"] == fingerprint

    with pytest.raises(FileExistsError) as info:
        prepare_output(tmp_path / "run", fingerprint, resume=False, overwrite=False)
    assert str(info.value) == (
        f"output directory {tmp_path / 'run'} holds an unfinished run (.dsf-partial/, blocks [] finished); "
        "pass --resume to continue it or --overwrite to start over"
    )
    with pytest.raises(ValueError) as info:
        prepare_output(tmp_path / "run", {**fingerprint, "density": 0.4, "seed": 1}, resume=True, overwrite=False)
    assert str(info.value) == (
        f"cannot resume the unfinished run in {tmp_path / 'run'}: it was started with different settings "
        "(density: 0.5 -> 0.4; seed: None -> 1); rerun with the original settings, or pass --overwrite to start over"
    )
    assert prepare_output(tmp_path / "run", fingerprint, resume=True, overwrite=False).path == partial.path
    prepare_output(tmp_path / "run", {"other": 1}, resume=False, overwrite=True)  # starts over

    (tmp_path / "run" / "dsf_manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a compressed model \(dsf_manifest.json\); pass "):
        prepare_output(tmp_path / "run", fingerprint, resume=True, overwrite=False)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine is not empty and holds no dsf output; choose another --output"):
        prepare_output(tmp_path / "mine", fingerprint, resume=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()
