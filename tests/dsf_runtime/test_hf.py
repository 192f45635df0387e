"""The transformers round trip (dsf_runtime.hf): ``AutoModelForCausalLM.from_pretrained`` of a compressed directory
loads it packed with the same logits as ``dsf_runtime.from_pretrained``; ``save_pretrained`` writes a directory both
loaders read back bit for bit; ``num_parameters`` counts stored values; what cannot round-trip raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dsf_runtime
from dsf_runtime import CheckpointError, FactorizedLinear, SparseLinear, from_pretrained, open_compressed, save_compressed
from dsf_runtime.hf import DsfConfig
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)
from tests.dsf_runtime.helpers import compress_randomly, tiny_llama, uncompressed

os.environ["HF_HUB_OFFLINE"] = "1"
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3], [4, 8, 15, 16, 23, 42, 7]])


def _compressed(tmp_path: Path, layout: str, dtype: torch.dtype | None) -> Path:
    model = tiny_llama(attention_bias=True)
    layers = compress_randomly(model, layout, dtype, single=("mlp.down_proj",))
    return save_compressed(tmp_path / "src", tensors=uncompressed(model, layers), layers=layers,
                           config_source=model.config.to_dict(), info={"base_model": "tiny-llama"})


def _hf_load(directory: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with open_compressed(directory) as ckpt:
        return ckpt.read(list(ckpt.weight_map))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


LAYOUTS = [("auto", torch.float16), ("csr", torch.bfloat16), ("bsr", torch.float16), ("nibble", torch.float16),
           ("delta", torch.float32), ("dense", None)]


@pytest.mark.parametrize(("layout", "dtype"), LAYOUTS)
def test_transformers_loads_packed_with_the_same_logits(tmp_path: Path, layout: str, dtype) -> None:
    directory = _compressed(tmp_path, layout, dtype)
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dsf"
    ours, theirs = from_pretrained(directory), _hf_load(directory)
    assert torch.equal(_logits(theirs), _logits(ours))
    stored = _tensors(directory)
    for name, module in theirs.named_modules():
        if isinstance(module, (FactorizedLinear, SparseLinear)):
            assert not hasattr(module, "weight")
            for key, tensor in module.state_dict().items():  # every packed tensor as stored, bit for bit
                assert tensor.dtype == stored[f"{name}.{key}"].dtype and torch.equal(tensor, stored[f"{name}.{key}"])
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert theirs.is_quantized and theirs.config.quantization_config.quant_method == "dsf"


@pytest.mark.parametrize(("layout", "dtype"), [("auto", torch.float16), ("nibble", torch.float16)])
@pytest.mark.parametrize("loader", ["dsf_runtime", "transformers"])
def test_save_pretrained_round_trips_bit_exact(tmp_path: Path, layout: str, dtype, loader: str) -> None:
    directory = _compressed(tmp_path, layout, dtype)
    model = from_pretrained(directory) if loader == "dsf_runtime" else _hf_load(directory)
    want = _logits(model)
    model.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "dsf_manifest.json").is_file() and (saved / "generation_config.json").is_file()
    before, after = _tensors(directory), _tensors(saved)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    source, written = (json.loads((d / "dsf_manifest.json").read_text()) for d in (directory, saved))
    assert written["layers"] == source["layers"]  # methods, errors, layouts and counts kept
    assert written["base_model"] == "tiny-llama"
    assert torch.equal(_logits(from_pretrained(saved)), want)
    assert torch.equal(_logits(_hf_load(saved)), want)


def test_num_parameters_counts_the_stored_values(tmp_path: Path) -> None:
    directory = _compressed(tmp_path, "bitmask", torch.float16)
    dense = tiny_llama(attention_bias=True)
    tensors = _tensors(directory)
    with open_compressed(directory) as ckpt:
        index_parts = {n for n in tensors if n.rpartition(".")[0].rpartition(".")[0] in ckpt.layers
                       and not n.endswith(".values")}
    stored = sum(t.numel() for n, t in tensors.items() if n not in index_parts)
    for model in (from_pretrained(directory), _hf_load(directory)):
        assert model.num_parameters() == stored
        assert model.num_parameters() < dense.num_parameters()
        assert not any(p.requires_grad for p in model.parameters())


def test_transformers_own_writer_refuses_and_writes_nothing(tmp_path: Path) -> None:
    from transformers import PreTrainedModel

    model = _hf_load(_compressed(tmp_path, "bitmask", torch.float16))
    with pytest.raises(ValueError, match="not serializable"):
        PreTrainedModel.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_pretrained_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    model = from_pretrained(_compressed(tmp_path, "bitmask", torch.float16))
    with pytest.raises(ValueError, match="state_dict"):
        model.save_pretrained(tmp_path / "a", state_dict={})
    with pytest.raises(ValueError, match="upload_folder"):
        model.save_pretrained(tmp_path / "b", push_to_hub=True)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "c", safe_serialization=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_dense_model_with_a_dsf_config_names_dsf_compress(tmp_path: Path) -> None:
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="dsf compress"):
        _hf_load(tmp_path / "dense", quantization_config=DsfConfig())


def test_quantization_config_disagreeing_with_the_manifest_is_an_error(tmp_path: Path) -> None:
    directory = _compressed(tmp_path, "bitmask", torch.float16)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["layouts"] = ["csr"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*quantization_config\.layouts.*\['bitmask'\]"):
        from_pretrained(directory)


def test_transformers_path_validates_the_indices(tmp_path: Path) -> None:
    directory = _compressed(tmp_path, "csr", torch.float16)
    tensors = _tensors(directory)
    name = "model.layers.0.self_attn.q_proj.B.col_idx"
    tensors[name] = tensors[name].clone()
    tensors[name][0] = 64  # == in_features: out of range
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=name):
        _hf_load(directory)


def test_device_map_across_devices_is_refused(tmp_path: Path) -> None:
    directory = _compressed(tmp_path, "bitmask", torch.float16)
    with pytest.raises(ValueError, match="one device"):
        _hf_load(directory, device_map={"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                        "lm_head": "cpu"})


def test_registered_on_import() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["dsf"] is DsfConfig
    assert AUTO_QUANTIZER_MAPPING["dsf"] is dsf_runtime.hf.DsfQuantizer
