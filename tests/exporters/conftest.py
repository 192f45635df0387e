"""Fixtures: the real packaged SmolLM2 cut to 2 blocks, with random sparse factors saved as a compressed directory
in layout ``dense`` fp32 (what ``dsf compress`` writes)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dsf_runtime import CompressedLayer, save_compressed

N_BLOCKS = 2
SINGLE = ("self_attn.o_proj",)  # these layers get kind ``single``, the others ``dsf``


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: the machine's 2 cores are shared, and these tensors are small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse(rows: int, cols: int, density: float, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """fp32 ``[rows, cols]``, about ``density`` of it non-zero (normal values times ``scale``)."""
    mask = torch.rand(rows, cols, generator=generator) < density
    return torch.randn(rows, cols, generator=generator) * scale * mask


def random_layer(weight: torch.Tensor, kind: str, generator: torch.Generator) -> CompressedLayer:
    """Random factors of a sane size for ``weight`` [out, in] in layout ``dense`` fp32: DSF's square factor is the
    identity plus sparse noise with one empty inner index (to be dropped by packed layouts), the other factor a
    masked ``weight``; ``single`` is the masked weight."""
    out, inp = weight.shape
    masked = weight.detach().float() * (torch.rand(out, inp, generator=generator) < 0.5)
    if kind == "single":
        return CompressedLayer.from_dense("single", {"W": masked}, method="random", error=1.0, relative_error=0.1)
    k = min(out, inp)
    square = torch.eye(k) + sparse(k, k, 0.05, generator, 0.05)
    factors = {"A": square, "B": masked} if out < inp else {"A": masked, "B": square}
    factors["A"][:, k // 2] = 0
    return CompressedLayer.from_dense("dsf", factors, method="random", error=None, relative_error=None)


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The packaged SmolLM2 (fp32) truncated to ``N_BLOCKS`` blocks, and a directory with its config.json and
    tokenizer files."""
    from transformers import AutoModelForCausalLM

    from compress.assets import smollm2_dir

    source = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.model.layers = model.model.layers[:N_BLOCKS]
    model.config.num_hidden_layers = N_BLOCKS
    base = tmp_path_factory.mktemp("smollm2-2blocks")
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = N_BLOCKS
    (base / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "generation_config", "chat_template")):
            shutil.copy(path, base / path.name)
    return model.eval(), base


@pytest.fixture(scope="session")
def compressed_dir(smollm2_base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compressed directory (layout ``dense``, fp32) of the 2-block SmolLM2 with random factors: every linear
    of the blocks is compressed, ``o_proj`` as kind ``single``, the others as ``dsf``."""
    model, base = smollm2_base
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            layers[name] = random_layer(module.weight, "single" if name.endswith(SINGLE) else "dsf", generator)
    tensors = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    out = tmp_path_factory.mktemp("compressed") / "smollm2-dense"
    info = {"base_model": "smollm2-135m-2blocks", "compression": {"method": "random", "density": 0.5}}
    return save_compressed(out, tensors=tensors, layers=layers, config_source=base, info=info)

