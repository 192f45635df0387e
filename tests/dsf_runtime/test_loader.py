"""from_pretrained on compressed directories: logits equal a dense model holding the factor products, generate()
works, weights stay packed and tied; one test on the real SmolLM2 truncated to 2 layers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dsf_runtime import (
    CheckpointError,
    FactorizedLinear,
    SparseLinear,
    from_pretrained,
    load_tokenizer,
    save_compressed,
)
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)
from tests.dsf_runtime.helpers import compress_randomly, tiny_llama, uncompressed

os.environ["HF_HUB_OFFLINE"] = "1"


def _compressed(tmp_path: Path, layout: str = "dense", dtype=None, **kwargs):
    model = tiny_llama(**kwargs)
    layers = compress_randomly(model, layout, dtype, single=("mlp.down_proj",))
    directory = save_compressed(tmp_path / layout, tensors=uncompressed(model, layers), layers=layers,
                                config_source=model.config.to_dict(), info={"base_model": "tiny-llama"})
    return model, layers, directory


@pytest.mark.parametrize(("layout", "dtype"), [("dense", None), ("bitmask", torch.float16), ("csr", torch.bfloat16),
                                               ("bsr", torch.float16), ("nibble", torch.float16),
                                               ("delta", torch.float32)])
def test_logits_match_dense_product(tmp_path: Path, layout: str, dtype) -> None:
    reference, layers, directory = _compressed(tmp_path, layout, dtype, attention_bias=True)
    model = from_pretrained(directory)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    for fqn, layer in layers.items():
        module = model.get_submodule(fqn)
        assert isinstance(module, FactorizedLinear if layer.kind == "dsf" else SparseLinear)
        assert not hasattr(module, "weight")  # no dense copy
        assert (module.bias is not None) == ("self_attn" in fqn)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training


def test_generate_matches_reference(tmp_path: Path) -> None:
    reference, _, directory = _compressed(tmp_path, "bitmask", torch.float16)
    model = from_pretrained(directory)
    ids = torch.tensor([[1, 5, 9, 13]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_in_half_precision(tmp_path: Path, dtype: torch.dtype) -> None:
    reference, layers, directory = _compressed(tmp_path, "dense", tie=False)
    model = from_pretrained(directory, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.model.layers[0].mlp.up_proj.A.values.dtype == dtype
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_missing_and_unexpected_uncompressed_tensors(tmp_path: Path) -> None:
    model = tiny_llama()
    layers = compress_randomly(model)
    tensors = uncompressed(model, layers)
    del tensors["model.norm.weight"]
    directory = save_compressed(tmp_path / "a", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    with pytest.raises(CheckpointError) as info:
        from_pretrained(directory)
    assert str(info.value) == (
        f"{directory / 'model.safetensors'}: tensor 'model.norm.weight' is missing; the checkpoint does not fit the "
        "LlamaForCausalLM that config.json describes; re-export it"
    )
    tensors = {**uncompressed(model, layers), "model.extra.weight": torch.ones(2)}
    directory = save_compressed(tmp_path / "b", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.extra.weight' \(the LlamaForCausalLM built"):
        from_pretrained(directory)
    tensors = {**uncompressed(model, layers), "model.norm.weight": torch.ones(3)}
    directory = save_compressed(tmp_path / "c", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[3\], the model expects \[64\]"):
        from_pretrained(directory)


def test_checkpoint_code_is_never_run(tmp_path: Path) -> None:
    """An ``auto_map`` (Python shipped with the checkpoint) is refused before anything is imported or built."""
    import json

    _, _, directory = _compressed(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text("raise SystemExit('imported the checkpoint code')\n")
    with pytest.raises(CheckpointError, match=r"config\.json: has an 'auto_map'.*remove 'auto_map'"):
        from_pretrained(directory)


def test_layer_not_in_model(tmp_path: Path) -> None:
    model = tiny_llama()
    layers = compress_randomly(model)
    layers["model.layers.0.mlp.nope"] = layers.pop("model.layers.0.mlp.up_proj")
    tensors = {k: v for k, v in uncompressed(model, layers).items() if "up_proj" not in k}
    directory = save_compressed(tmp_path / "a", tensors=tensors, layers=layers, config_source=model.config.to_dict())
    with pytest.raises(CheckpointError, match=r"dsf_manifest\.json: layer 'model\.layers\.0\.mlp\.nope' is not a "
                       r"Linear \[160, 64\] of the LlamaForCausalLM .*no such module"):
        from_pretrained(directory)


@pytest.mark.slow
def test_smollm2_two_layers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from compress.assets import smollm2_dir

    source = smollm2_dir()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference.model.layers = reference.model.layers[:2]
    reference.config.num_hidden_layers = 2
    config_dir = tmp_path / "base"
    config_dir.mkdir()
    reference.config.save_pretrained(config_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, config_dir / name)
    layers = compress_randomly(reference)
    directory = save_compressed(tmp_path / "out", tensors=uncompressed(reference, layers), layers=layers,
                                config_source=config_dir, info={"base_model": "smollm2-135m"})
    tokenizer = load_tokenizer(directory)
    ids = tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = reference(ids).logits
        for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 0.06), (torch.float16, 0.02)]:
            model = from_pretrained(directory, dtype=dtype)
            assert model.lm_head.weight is model.model.embed_tokens.weight
            got = model(ids).logits.float()
            assert (got - want).abs().max() <= tol * want.abs().max(), dtype
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
