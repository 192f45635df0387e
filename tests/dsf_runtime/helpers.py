"""Shared test helpers: bit-exact comparison, random sparse matrices, a tiny Llama and random DSF compression."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from dsf_runtime import CompressedLayer

INT_VIEW = {2: torch.int16, 4: torch.int32}


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run torch on one thread: these tensors are small, and on a shared 2-core machine intra-op threads spin
    against other processes (a 64x64 matmul took 40 ms with 2 threads under load, 0.02 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit, except that a zero may come back with either sign."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape)
    zero = expected == 0
    assert bool((actual[zero] == 0).all()), "a zero came back non-zero"
    view = INT_VIEW[expected.element_size()]
    assert torch.equal(actual[~zero].view(view), expected[~zero].view(view))


def random_sparse(rows: int, cols: int, density: float, *, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """fp32 ``[rows, cols]`` with about ``density`` of its entries non-zero (normal values times ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * scale * (torch.rand(rows, cols, generator=g) < density)


def near_identity_factors(weight: torch.Tensor, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Random sparse DSF factors of a sane size for ``weight`` [out, in]: the square factor is the identity plus
    sparse noise, the other a randomly masked ``weight``, so a model keeps working activations."""
    out, inp = weight.shape
    k = min(out, inp)
    g = torch.Generator().manual_seed(seed)
    square = torch.eye(k) + 0.05 * random_sparse(k, k, 0.05, seed=seed + 1)
    masked = weight.detach().float() * (torch.rand(weight.shape, generator=g) < density)
    return {"A": square, "B": masked} if out < inp else {"A": masked, "B": square}


def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]


def compress_randomly(
    model: nn.Module, layout: str = "dense", dtype: torch.dtype | None = None, *, single: tuple[str, ...] = ()
) -> dict[str, CompressedLayer]:
    """Replace every Linear's weight (in place) by its random compressed approximation and return the layers.

    Layers whose name ends with one of ``single`` get kind ``single``; the others ``dsf``. The model's weights
    become the exact dense product of the packed factors (computed in fp32), so the model is the reference.
    """
    layers = {}
    for i, name in enumerate(linear_names(model)):
        module = model.get_submodule(name)
        bias = None if module.bias is None else module.bias.detach().clone()
        if name.endswith(single):
            factors, kind = {"W": module.weight.detach().float() * (torch.rand(module.weight.shape) < 0.5)}, "single"
        else:
            factors, kind = near_identity_factors(module.weight, 0.4, seed=i), "dsf"
        opts = {"block_size": 16} if layout == "bsr" else {}
        layer = CompressedLayer.from_dense(kind, factors, method="random", bias=bias, layout=layout, dtype=dtype,
                                           error=float(i), relative_error=0.01 * i, **opts)
        with torch.no_grad():
            module.weight.copy_(layer.weight())
        layers[name] = layer
    return layers


def uncompressed(model: nn.Module, layers: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in layers}


def tiny_llama(vocab_size: int = 128, *, attention_bias: bool = False, tie: bool = True, seed: int = 0):
    """A random 2-layer LlamaForCausalLM, hidden 64, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, attention_bias=attention_bias,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def built_cpu_kernel():
    """``dsf_runtime.kernels.cpu`` with the runtime's build loaded (built here when missing); skips the test when
    there is no C++ compiler."""
    import shutil

    from dsf_runtime.kernels import cpu

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler (g++): the CPU kernel cannot be built; scripts/setup.sh installs it")
    if cpu.available() is not None:
        cpu.build()
    assert cpu.available() is None
    return cpu
