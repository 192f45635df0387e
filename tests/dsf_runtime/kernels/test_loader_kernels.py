"""The loader's kernel path: stored layouts converted once at load time to the kernel layouts (and nothing else
kept), kernel layouts stored in the directory read as they are, outputs equal the pure-torch path, greedy
generation over a static cache equals HF ``generate``.

On the CPU the Triton kernels run in the interpreter (conftest) on a one-block Llama, with row blocks large
enough to keep the number of interpreted programs small; the CUDA-graph test needs a GPU."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch

from dsf_runtime import CompressedLayer, FactorizedLinear, SparseLinear, from_pretrained, loader, save_compressed
from dsf_runtime.checkpoint import open_compressed
from dsf_runtime.formats import DeltaMatrix, DenseMatrix, NibbleMatrix, kernel_layout
from dsf_runtime.formats.nibble import balance_mask
from dsf_runtime.generation import greedy_generate
from dsf_runtime.kernels import configs
from dsf_runtime.loader import use_kernels, warmup
from dsf_runtime.modules import PackedFactor
from tests.dsf_runtime.helpers import linear_names, random_sparse, tiny_llama, uncompressed
from tests.dsf_runtime.kernels.conftest import HAS_CUDA

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def few_programs(monkeypatch) -> None:
    """Under the interpreter every program costs ~0.1 s: take 16-row blocks (nibble rows are padded to 16)."""
    if HAS_CUDA:
        return
    heuristic = configs.heuristic

    def wide(op: str, rows: int, per_row: int, BN: int) -> dict:
        return dict(heuristic(op, rows, per_row, BN), BLOCK_R=16 if op == "nibble" else 4)

    monkeypatch.setattr(configs, "heuristic", wide)


def _balanced(rows: int, cols: int, per_group: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * balance_mask(torch.rand(rows, cols, generator=g), per_group)


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Tiny Llama: even layers balanced DSF (nibble), odd layers unstructured DSF (delta), down_proj single."""
    model = tiny_llama(attention_bias=True, seed=3)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    layers = {}
    for i, name in enumerate(linear_names(model)):
        lin = model.get_submodule(name)
        out, inp = lin.weight.shape
        k = min(out, inp)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        if name.endswith("down_proj"):
            layer = CompressedLayer.from_dense("single", {"W": _balanced(out, inp, 8, i) * 0.1}, method="t",
                                               bias=bias, layout="bitmask", dtype=torch.float16)
        elif i % 2 == 0:
            factors = {"A": _balanced(out, k, 6, i) * 0.3, "B": _balanced(k, inp, 4, 100 + i) * 0.3}
            layer = CompressedLayer.from_dense("dsf", factors, method="t", bias=bias, layout="csr", dtype=torch.float16)
        else:
            factors = {"A": random_sparse(out, k, 0.2, seed=i) * 0.3,
                       "B": random_sparse(k, inp, 0.2, seed=50 + i) * 0.3}
            layer = CompressedLayer.from_dense("dsf", factors, method="t", bias=bias, layout="bitmask",
                                               dtype=torch.float16)
        layers[name] = layer
        with torch.no_grad():
            lin.weight.copy_(layer.weight())
    path = save_compressed(tmp_path_factory.mktemp("kernels") / "dir", tensors=uncompressed(model, layers),
                           layers=layers, config_source=model.config.to_dict())
    return path, model


def _device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


KERNEL_LAYOUTS = (NibbleMatrix, DeltaMatrix, DenseMatrix)


def _factors(model) -> list:
    return [f.packed() for m in model.modules() if isinstance(m, PackedFactor) for f in [m]]


def test_converted_once_and_only_kernel_layout_kept(directory) -> None:
    path, _ = directory
    model = from_pretrained(path, device=_device(), dtype=torch.float16, kernels=True)
    compressed = [m for m in model.modules() if isinstance(m, (FactorizedLinear, SparseLinear))]
    assert len(compressed) == 7
    factors = _factors(model)
    assert all(isinstance(f, KERNEL_LAYOUTS) for f in factors) and {NibbleMatrix, DeltaMatrix} <= set(map(type, factors))
    for name, module in model.named_modules():
        if isinstance(module, PackedFactor):
            buffers = dict(module.named_buffers())
            k = module.packed()
            assert set(buffers) | {"values"} == set(k.parts) and module.values is k.values, name
            assert all(getattr(k, p) is t for p, t in buffers.items())  # the kernels read the module's tensors
            assert k is module.packed()  # no rebuild per call
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.A.index" in sd and "model.layers.0.self_attn.q_proj.A.col_idx" not in sd
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float16


def test_stored_kernel_layouts_load_without_a_dense_intermediate(directory, tmp_path, monkeypatch) -> None:
    """A directory stored in nibble/delta loads on the kernel path with no conversion (they are never decoded), and
    the module's tensors are the stored ones, bit for bit."""
    path, _ = directory
    ckpt = open_compressed(path)
    layers = {fqn: ckpt.load_layer(fqn) for fqn in ckpt.layers}
    layers = {fqn: CompressedLayer(l.kind, l.shape, {k: kernel_layout(f) for k, f in l.factors.items()}, l.method,
                                   l.bias) for fqn, l in layers.items()}
    stored = save_compressed(tmp_path / "kernel-layouts", tensors=ckpt.load_tensors(), layers=layers,
                             config_source=path)
    assert {NibbleMatrix, DeltaMatrix} <= {type(f) for layer in layers.values() for f in layer.factors.values()}
    for cls in (NibbleMatrix, DeltaMatrix):
        monkeypatch.setattr(cls, "dense_rows", lambda *a, **k: pytest.fail("a stored kernel layout was decoded"))
    model = from_pretrained(stored, device=_device(), kernels=True)
    sd = model.state_dict()
    for fqn, layer in layers.items():
        for key, factor in layer.factors.items():
            for part, tensor in factor.to_tensors(f"{fqn}.{key}").items():
                assert torch.equal(sd[part].cpu(), tensor), part


def test_kernel_path_matches_pure_torch(directory) -> None:
    path, reference = directory
    fast = from_pretrained(path, device=_device(), dtype=torch.float16, kernels=True)
    slow = from_pretrained(path, dtype=torch.float16, kernels=False)
    assert not any(isinstance(f, KERNEL_LAYOUTS) for f in _factors(slow))
    g = torch.Generator().manual_seed(0)
    for tokens in (3, 24):  # decode kernels (≤ 16 tokens) and the prefill path
        ids = torch.randint(0, 128, (1, tokens), generator=g)
        with torch.no_grad():
            got = fast(ids.to(_device())).logits.float().cpu()
            want = slow(ids).logits.float()
            exact = reference(ids).logits
        scale = exact.abs().max()
        assert (got - want).abs().max() <= 2e-2 * scale, tokens
        assert (got - exact).abs().max() <= 2e-2 * scale, tokens


def test_greedy_generate_matches_hf_generate(directory) -> None:
    path, _ = directory
    model = from_pretrained(path, device=_device(), dtype=torch.float16, kernels=True)
    slow = from_pretrained(path, dtype=torch.float32, kernels=False)
    ids = torch.tensor([[1, 7, 42, 99, 5]])
    res = greedy_generate(model, ids.to(_device()), 4)
    want = slow.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert res.ids.shape == (1, 9) and torch.equal(res.ids.cpu(), want)
    assert res.decode_steps == (2 if HAS_CUDA else 3) and res.decode_tokens_per_s > 0


def test_warmup_runs_each_signature_once(directory) -> None:
    """Every distinct layer signature runs once per token count, a duplicate signature not at all."""
    path, _ = directory
    model = from_pretrained(path, device=_device(), dtype=torch.float16, kernels=True)
    attn = model.model.layers[0].self_attn
    attn.o_proj = copy.deepcopy(attn.q_proj)  # same signature as q_proj: warmed once
    calls: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (FactorizedLinear, SparseLinear)):
            module.register_forward_hook(lambda m, args, out, name=name: calls.setdefault(name, []).append(
                args[0].shape[0]))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, SparseLinear))}

    def signature(m) -> tuple:
        return (type(m), m.bias is not None, *[(type(f), tuple(t.shape for t in f.to_tensors().values()),
                                                 f.dtype, getattr(f, "per_group", None)) for f in m.factors()])

    kernel_modules = {n: m for n, m in modules.items() if all(f.kernel_ready(f.device) for f in m.factors())}
    distinct = {signature(m) for m in kernel_modules.values()}
    assert "model.layers.0.self_attn.o_proj" in kernel_modules and len(distinct) < len(kernel_modules)
    assert warmup(model, tokens=(1, 2)) == 2 * len(distinct)
    assert {signature(modules[n]) for n in calls} == distinct and len(calls) == len(distinct)
    assert all(tokens == [1, 2] for tokens in calls.values())
    assert warmup(from_pretrained(path, kernels=False)) == 0  # stored layouts on the CPU: nothing to compile


def test_use_kernels_converts_a_stored_model(directory) -> None:
    path, _ = directory
    model = from_pretrained(path, device=_device(), dtype=torch.float16, kernels=False)
    ids = torch.tensor([[3, 4, 5]], device=_device())
    with torch.no_grad():
        want = model(ids).logits.float()  # the pure-torch path over the stored layouts
        assert use_kernels(model) == 7
        got = model(ids).logits.float()
    assert all(isinstance(f, KERNEL_LAYOUTS) for f in _factors(model))
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert use_kernels(model) == 0


def test_kernels_argument(directory, monkeypatch, caplog) -> None:
    path, _ = directory
    assert not any(isinstance(f, KERNEL_LAYOUTS) for f in _factors(from_pretrained(path)))  # CPU default: stored
    assert loader._use_kernels(False, "cuda") is False
    monkeypatch.setattr(loader, "unavailable_reason", lambda device: "Triton is not installed")
    with caplog.at_level(logging.WARNING, logger="dsf_runtime.loader"):
        assert loader._use_kernels(None, "cuda") is False
    assert "pure-torch path: Triton is not installed" in caplog.text
    with pytest.raises(RuntimeError, match=r"kernels=True\) on cpu: Triton is not installed; pass kernels=None"):
        from_pretrained(path, kernels=True)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_equals_eager(directory) -> None:
    path, _ = directory
    model = from_pretrained(path, device="cuda", dtype=torch.float16)
    assert all(isinstance(f, KERNEL_LAYOUTS) for f in _factors(model))
    ids = torch.tensor([[1, 7, 42, 99, 5], [2, 8, 43, 98, 6]], device="cuda")
    graphed = greedy_generate(model, ids, 12, cuda_graphs=True)
    eager = greedy_generate(model, ids, 12, cuda_graphs=False)
    assert graphed.cuda_graphs and graphed.graph_error is None and not eager.cuda_graphs
    assert torch.equal(graphed.ids, eager.ids)
