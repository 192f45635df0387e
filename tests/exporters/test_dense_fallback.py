"""``export_dense_fallback``: a plain Hugging Face checkpoint with the factors multiplied out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsf_runtime import from_pretrained, open_compressed
from exporters.dense_fallback import export_dense_fallback


def _ids() -> torch.Tensor:
    return torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(), use_cache=False).logits


def test_plain_transformers_loads_it_with_the_compressed_logits(compressed_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = export_dense_fallback(compressed_dir, tmp_path / "dense-hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    ckpt = open_compressed(compressed_dir)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        for fqn in ckpt.layers:
            assert torch.equal(f.get_tensor(f"{fqn}.weight"), ckpt.load_layer(fqn).weight())
    assert {f"{fqn}.weight" for fqn in ckpt.layers} <= names
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(type(m).__module__.startswith("dsf_runtime") for m in plain.modules())
    expected = _logits(from_pretrained(compressed_dir))
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-4, atol=1e-4)


def test_float16_and_shards(compressed_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = export_dense_fallback(compressed_dir, tmp_path / "fp16", dtype=torch.float16, max_shard_size="40MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert plain.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    expected = _logits(from_pretrained(compressed_dir))
    torch.testing.assert_close(_logits(plain).float(), expected, rtol=0, atol=0.05 * expected.abs().max().item())


def test_refuses_a_non_empty_destination(compressed_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        export_dense_fallback(compressed_dir, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
