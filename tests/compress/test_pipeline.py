"""The block-sequential driver on the real SmolLM2-135M truncated to 2 blocks (CPU, small calibration).

These tests prove the calibration plumbing: the captured block-0 inputs are exactly what the model passes to its
first block, the sequential pass reproduces the model's forward, and the Hessians the driver accumulates equal
those of a direct forward of the (compressed) model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compress.architectures import architecture_for
from compress.calibration import capture_block_inputs, compress_blocks
from compress.data import load_calibration
from compress.solvers import make_config

CPU = torch.device("cpu")


def two_block_smollm2():
    """The packaged SmolLM2 (fp32) keeping its first 2 decoder blocks, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.assets import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model, AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def smol():
    return two_block_smollm2()


@pytest.fixture(scope="module")
def windows(smol):
    return load_calibration(smol[1], "emma", 4, 64, 0)  # [4, 64]


def _direct_linear_inputs(model, windows, names):
    """Inputs of the named linears in a plain forward: {name: [N·S, in]}."""
    seen = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
        for name in names
    ]
    try:
        with torch.inference_mode():
            model(input_ids=windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs).reshape(-1, xs[0].shape[-1]) for name, xs in seen.items()}


def test_captured_inputs_equal_the_models_own_block0_call(smol, windows):
    model, _ = smol
    recorded = {}

    def hook(module, args, kwargs):
        recorded["hidden"], recorded["kwargs"] = args[0], kwargs

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=windows, use_cache=False)
            embeddings = model.model.embed_tokens(windows)
    finally:
        handle.remove()
    captured = capture_block_inputs(model, architecture_for(model.config), windows, device=CPU, storage=CPU,
                                    batch_size=4)
    assert len(captured.hidden) == 1
    assert torch.equal(captured.hidden[0], embeddings)
    assert torch.equal(captured.hidden[0], recorded["hidden"])
    cos, sin = captured.kwargs[0]["position_embeddings"]
    assert torch.equal(cos, recorded["kwargs"]["position_embeddings"][0])
    assert torch.equal(sin, recorded["kwargs"]["position_embeddings"][1])
    assert torch.equal(captured.kwargs[0]["position_ids"], recorded["kwargs"]["position_ids"])
    assert set(captured.kwargs[0]) == set(recorded["kwargs"])


@pytest.mark.slow
def test_density_one_reproduces_the_forward(smol, windows):
    model = copy.deepcopy(smol[0])
    with torch.inference_mode():
        expected = model(input_ids=windows, use_cache=False).logits
    last = compress_blocks(model, architecture_for(model.config), windows, make_config("magnitude", 1.0),
                           device=CPU, batch_size=3, progress=False)  # chunks of 3 and 1 windows
    with torch.inference_mode():
        logits = model.lm_head(model.model.norm(torch.cat(last.hidden)))
        after = model(input_ids=windows, use_cache=False).logits
    # Chunks of 3 and 1 windows against one batch of 4: multi-threaded GEMMs round differently per batch size, by
    # a few fp32 ulps of logits of magnitude ~20.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-4)


def _record_hessians(monkeypatch):
    """Make the driver's solve_group record (first layer name, H) of every call."""
    import compress.calibration as calibration

    calls = []
    real = calibration.solve_group

    def recording(weights, hessian, config, **kwargs):
        calls.append(hessian.clone())
        return real(weights, hessian, config, **kwargs)

    monkeypatch.setattr(calibration, "solve_group", recording)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize(("density", "true_sequential", "dense_inputs"),
                         [(1.0, False, False), (0.5, True, False), (0.5, False, True)])
def test_hessians_equal_a_direct_forward_of_the_compressed_model(smol, windows, monkeypatch, density,
                                                                 true_sequential, dense_inputs):
    """At density 1.0 the model never changes; with true_sequential every group's H is collected after the earlier
    groups and blocks were compressed, so both equal H from a plain forward of the final model. With dense_inputs
    every H is that of the dense model."""
    model = copy.deepcopy(smol[0])
    dense = copy.deepcopy(smol[0]) if dense_inputs else None
    spec = architecture_for(model.config)
    calls = _record_hessians(monkeypatch)
    compress_blocks(model, spec, windows, make_config("magnitude", density), device=CPU, batch_size=2,
                    true_sequential=true_sequential, dense_inputs=dense_inputs, progress=False)
    firsts = [f"model.layers.{b}.{group[0]}" for b in range(2) for group in spec.groups]
    assert len(calls) == len(firsts) == 8
    direct = _direct_linear_inputs(dense if dense_inputs else model, windows, firsts)
    for name, hessian in zip(firsts, calls):
        x = direct[name].double()
        expected = (2 / windows.shape[0]) * x.T @ x  # H = (2/N)·Σ xxᵀ, N = samples
        torch.testing.assert_close(hessian.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    if density < 1:  # the compressed block 0 really fed block 1
        assert model.model.layers[0].mlp.down_proj.weight.count_nonzero() == 576 * 1536 // 2


def test_offload_and_storage_choice():
    from compress.calibration import activation_storage

    assert activation_storage("auto", CPU, 64, 512, 576, torch.float32) == CPU
    assert activation_storage("always", torch.device("cuda"), 64, 512, 576, torch.float32) == CPU
    assert activation_storage("never", torch.device("cuda"), 64, 512, 576, torch.float32) == torch.device("cuda")


def test_an_unknown_pipeline_is_refused():
    from compress.api import CompressConfig, ConfigError

    with pytest.raises(ConfigError, match="pipeline: must be one of sequential, dense-inputs, got 'parallel'"):
        CompressConfig(pipeline="parallel")
    assert CompressConfig(pipeline="dense-inputs").to_dict()["pipeline"] == "dense-inputs"  # part of the fingerprint
