"""Models for benchmarks/bench_e2e.py: a randomly initialised LLaMA-2-7B-shaped model built on the device, and
random DSF compression with balanced masks (the layout the ``nibble`` kernels stream), in memory or through a
compressed directory and ``from_pretrained``.

Random masks and values are fine for timing: the kernels' work depends only on the shapes and the slots per group.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dsf_runtime import CompressedLayer, FactorizedLinear, SparseLinear, pack, save_compressed
from dsf_runtime.formats import NibbleMatrix
from dsf_runtime.formats.nibble import balance_mask
from dsf_runtime.kernels import unavailable_reason

__all__ = ["LLAMA2_7B", "TINY_LLAMA", "build_random_llama", "compress_in_place", "compress_to_directory",
           "compressible_linears", "random_dsf_factors", "weight_bytes"]

# LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000); TINY_LLAMA for dry runs.
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)


def build_random_llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` with ``shape``'s config, its weights initialised on ``device`` directly (no CPU copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def compressible_linears(model: nn.Module) -> list[str]:
    """Names of the decoder's linear (or already compressed) layers; the LM head stays dense."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, FactorizedLinear, SparseLinear)) and not n.endswith("lm_head")]


def _balanced(rows: int, cols: int, per_group: int, std: float, dtype, device, gen) -> torch.Tensor:
    mask = balance_mask(torch.rand(rows, cols, device=device, generator=gen), per_group, 16)
    return (torch.randn(rows, cols, device=device, generator=gen) * std * mask).to(dtype)


def random_dsf_factors(shape: tuple[int, int], density: float, dtype: torch.dtype, device: torch.device,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dense ``A`` [out, k], ``B`` [k, in] (k = min(out, in)) with random balanced masks at the split
    ``propose_balanced_split(shape, density)`` gives, scaled so that ``A·B`` has entries of std ≈ 0.02.

    Returns:
        ``(A, B, split)`` with ``split`` the proposal (``N_A``, ``N_B``, ``nnz``, ...).
    """
    from compress.solvers.split import propose_balanced_split

    split = propose_balanced_split(shape, density)
    (ra, ca), (rb, cb) = split["A_shape"], split["B_shape"]
    da, db = split["N_A"] / 16, split["N_B"] / 16
    A = _balanced(ra, ca, split["N_A"], 1.0 / math.sqrt(ca * da), dtype, device, gen)
    B = _balanced(rb, cb, split["N_B"], 0.02 / math.sqrt(db), dtype, device, gen)
    return A, B, split


def compress_in_place(model: nn.Module, density: float, *, seed: int = 0, kernels: bool | None = None) -> dict:
    """Replace every decoder linear by a ``FactorizedLinear`` with random balanced factors, one layer at a time
    (the old weight is released before the next layer is built).

    ``kernels`` (default: on CUDA when the kernels run there): pack the factors in the kernels' ``nibble`` layout;
    else as ``bitmask`` (pure-torch path).

    Returns:
        ``{"nnz", "elements", "nnz_density", "kernels": bool, "splits": {shape: [N_A, N_B]}}``.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if kernels is None:
        kernels = device.type == "cuda" and unavailable_reason(device) is None
    gen = torch.Generator(device=device).manual_seed(seed)
    nnz = elements = 0
    splits = {}
    for name in compressible_linears(model):
        old = model.get_submodule(name)
        shape = (old.out_features, old.in_features)
        A, B, split = random_dsf_factors(shape, density, dtype, device, gen)
        if kernels:
            new = FactorizedLinear(NibbleMatrix.from_dense(A), NibbleMatrix.from_dense(B), old.bias)
        else:
            new = FactorizedLinear(pack(A, "bitmask"), pack(B, "bitmask"), old.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        del old, A, B
        nnz += split["nnz"]
        elements += shape[0] * shape[1]
        splits[f"{shape[0]}x{shape[1]}"] = [split["N_A"], split["N_B"]]
    return {"nnz": nnz, "elements": elements, "nnz_density": nnz / max(elements, 1), "kernels": kernels,
            "splits": splits}


def compress_to_directory(model: nn.Module, density: float, directory: Path, config_source, *,
                          seed: int = 0, layout: str = "bitmask") -> dict:
    """Write ``model`` with every decoder linear replaced by random balanced DSF factors (in ``layout``) as a
    compressed directory that ``from_pretrained`` loads. ``model`` is not modified.

    Returns:
        ``{"nnz", "elements", "nnz_density", "directory"}``.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    layers, nnz, elements = {}, 0, 0
    names = compressible_linears(model)
    for name in names:
        lin = model.get_submodule(name)
        shape = (lin.out_features, lin.in_features)
        A, B, split = random_dsf_factors(shape, density, dtype, device, gen)
        bias = None if lin.bias is None else lin.bias.detach()
        layers[name] = CompressedLayer.from_dense("dsf", {"A": A, "B": B}, method="random-balanced", bias=bias,
                                                  layout=layout, dtype=dtype)
        nnz += split["nnz"]
        elements += shape[0] * shape[1]
    skip = {f"{n}.weight" for n in names} | {f"{n}.bias" for n in names}
    tensors = {k: v for k, v in model.state_dict().items() if k not in skip}
    save_compressed(directory, tensors=tensors, layers=layers, config_source=config_source,
                    info={"base_model": "random-balanced-dsf", "compression": {"density": density, "seed": seed}})
    return {"nnz": nnz, "elements": elements, "nnz_density": nnz / max(elements, 1), "directory": str(directory)}


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the model's parameters and buffers (shared storage counted once): ``total`` and ``linear`` (the
    decoder's linear / compressed layers only)."""
    def size(tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    total = size([*model.parameters(), *model.buffers()])
    linear = sum(size([*model.get_submodule(n).parameters(), *model.get_submodule(n).buffers()])
                 for n in compressible_linears(model))
    return {"total": total, "linear": linear}
