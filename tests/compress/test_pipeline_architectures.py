"""The driver on other decoder architectures, built locally with random weights (2 tiny blocks each)."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.api import CompressConfig, compress_model
from compress.architectures import architecture_for
from compress.calibration import compress_blocks
from compress.solvers import make_config

CPU = torch.device("cpu")
VOCAB = 49152  # SmolLM2's tokenizer is used for the calibration text


def _tiny(model_type: str):
    from transformers import MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    configs = {
        "qwen2": lambda: Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common),  # q/k/v biases
        "qwen3": lambda: Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common),
        "mistral": lambda: MistralConfig(intermediate_size=128, num_key_value_heads=2, **common),
        "opt": lambda: OPTConfig(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True, **common),  # all biased
    }
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[model_type]()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from compress.assets import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral", "opt"])
def test_density_one_reproduces_the_forward(model_type):
    model = _tiny(model_type)
    windows = torch.randint(0, VOCAB, (5, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(input_ids=windows, use_cache=False).logits
    spec = architecture_for(model.config)
    compress_blocks(model, spec, windows, make_config("magnitude", 1.0), device=CPU, batch_size=2, progress=False)
    with torch.inference_mode():
        after = model(input_ids=windows, use_cache=False).logits
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2", "opt"])
def test_dsf_output_reloads(model_type, tokenizer, tmp_path):
    """DSF at 50%: the reloaded factorized model computes what the compressed in-memory model (W = A·B) does."""
    import dsf_runtime

    model = _tiny(model_type)
    config = CompressConfig(method="dsf", density=0.5, solver_options={"iters": 2}, samples=4, seqlen=32,
                            device="cpu", batch_size=2, save_dtype="float32",
                            embedding="keep")  # the factors and the embedding as solved, no rounding
    report = compress_model(config, tmp_path / "out", model=model, tokenizer=tokenizer, progress=False)
    summary = report["layer_errors"]["summary"]
    assert summary["layers"] == 2 * sum(len(g) for g in architecture_for(model.config).groups)
    assert 0 < summary["mean_relative_error"] < 1
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    reloaded = dsf_runtime.from_pretrained(tmp_path / "out", device="cpu")
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == 2
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_dense_reference_is_not_touched_by_a_copy():
    """compress_blocks works in place; a deep copy keeps the original dense (what the benchmarks rely on)."""
    model = _tiny("qwen2")
    original = copy.deepcopy(model)
    windows = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    compress_blocks(model, architecture_for(model.config), windows, make_config("magnitude", 0.5), device=CPU,
                    progress=False)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert original.model.layers[0].mlp.up_proj.weight.count_nonzero() == 64 * 128
