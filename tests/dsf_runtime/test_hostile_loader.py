"""Hostile and broken compressed directories (issue 12): every case is a CheckpointError naming the file and the
field, layer or tensor, raised before any model is built; nothing hangs and nothing loads silently wrong."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsf_runtime import checkpoint, from_pretrained, open_compressed, save_compressed
from dsf_runtime.checkpoint import FILE_METADATA, INDEX_NAME, MANIFEST_NAME, SINGLE_FILE, CheckpointError
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)
from tests.dsf_runtime.helpers import compress_randomly, tiny_llama, uncompressed

LAYER = "model.layers.0.mlp.up_proj"


def build_tiny(directory: Path, max_shard_bytes: int | None = None) -> Path:
    """A real compressed 2-layer Llama (csr factors, float16) in ``directory``; sharded when ``max_shard_bytes``."""
    model = tiny_llama()
    layers = compress_randomly(model, "csr", torch.float16, single=("mlp.down_proj",))
    extra = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return save_compressed(directory, tensors=uncompressed(model, layers), layers=layers,
                           config_source=model.config.to_dict(), info={"base_model": "tiny"}, **extra)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("hostile") / "tiny")


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_layer(directory: Path, **fields) -> None:
    _edit_json(directory / MANIFEST_NAME, lambda m: m["layers"][LAYER].update(fields))


def _error(directory: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        from_pretrained(directory, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(("fields", "problem"), [
    ({"density": 1.5}, "has density 1.5, expected a number in [0, 1]"),
    ({"density": -1}, "has density -1, expected a number in [0, 1]"),
    ({"density": math.nan}, "has density nan, expected a number in [0, 1]"),
    ({"density": None}, "has density None, expected a number in [0, 1]"),
    ({"density": "0.5"}, "has density '0.5', expected a number in [0, 1]"),
    ({"density": 0.75}, "has density 0.75, but nnz / (out * in) = "),
    ({"nnz": -3}, "has nnz -3, expected an integer in [0, 2**53]"),
    ({"nnz": "12"}, "has nnz '12', expected an integer in [0, 2**53]"),
    ({"nnz": True}, "has nnz True, expected an integer in [0, 2**53]"),
    ({"inner_dim": 7}, "has inner_dim 7, but its factors give 64"),
    ({"error": "big"}, "has error 'big', expected a finite number or null"),
    ({"relative_error": math.inf}, "has relative_error inf, expected a finite number or null"),
    ({"density": 10**400}, "has density 1000"),
    ({"nnz": 2**60}, f"has nnz {2**60}, expected an integer in [0, 2**53]"),
])
def test_manifest_fields_checked_against_factors(ckpt: Path, fields: dict, problem: str) -> None:
    _edit_layer(ckpt, **fields)
    assert _error(ckpt).startswith(f"{ckpt / MANIFEST_NAME}: layer '{LAYER}' {problem}")


def test_nnz_must_be_the_factors_sum(ckpt: Path) -> None:
    nnz = json.loads((ckpt / MANIFEST_NAME).read_text())["layers"][LAYER]["nnz"]
    _edit_layer(ckpt, nnz=nnz + 1)
    assert f"layer '{LAYER}' has nnz {nnz + 1}, but its factors hold {nnz}; re-export" in _error(ckpt)


def test_format_version_true(ckpt: Path) -> None:
    _edit_json(ckpt / MANIFEST_NAME, lambda m: m.update(format_version=True))
    assert _error(ckpt) == (f"{ckpt / MANIFEST_NAME}: format_version is true, expected the integer 1; "
                            "re-export the checkpoint")


@pytest.mark.parametrize("name", [MANIFEST_NAME, "config.json", INDEX_NAME])
def test_deep_json(ckpt: Path, tmp_path: Path, name: str) -> None:
    if name == INDEX_NAME:
        ckpt = build_tiny(tmp_path / "sharded", max_shard_bytes=20_000)
    (ckpt / name).write_text("[" * 100_000 + "]" * 100_000)
    assert _error(ckpt).startswith(f"{ckpt / name}: JSON nested deeper than 64 levels; ")


def test_json_size_limit(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 1000)
    size = (ckpt / MANIFEST_NAME).stat().st_size
    assert _error(ckpt).startswith(f"{ckpt / MANIFEST_NAME}: {size} bytes, more than the 1000 a reader accepts")


def test_header_with_200k_extra_tensors_is_refused_quickly(ckpt: Path) -> None:
    path = ckpt / SINGLE_FILE
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header.update({f"pad.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [end, end]} for i in range(200_000)})
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    start = time.perf_counter()
    message = _error(ckpt)
    assert time.perf_counter() - start < 10
    assert message.startswith(f"{path}: safetensors header lists 200")
    assert "more than the 100000 tensors a reader accepts" in message


def test_huge_header_length(ckpt: Path) -> None:
    path = ckpt / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    assert _error(ckpt).startswith(f"{path}: safetensors header of {2**40} bytes, more than the ")


@pytest.mark.parametrize(("tensor", "bad"), [(f"{LAYER}.A.values", math.nan), (f"{LAYER}.B.values", -math.inf),
                                             ("model.norm.weight", math.inf)])
def test_nonfinite_values(ckpt: Path, tensor: str, bad: float) -> None:
    path = ckpt / SINGLE_FILE
    tensors = load_file(path)
    tensors[tensor][0] = bad
    save_file(tensors, path, metadata=FILE_METADATA)
    assert _error(ckpt) == (f"{path}: '{tensor}' holds NaN or Inf values; re-export the checkpoint from finite "
                            "weights, or pass allow_nonfinite=True to load it anyway")
    model = from_pretrained(ckpt, allow_nonfinite=True)
    assert not torch.isfinite(model.state_dict()[tensor]).all()


def test_conv_kind_on_a_linear(ckpt: Path) -> None:
    _edit_layer(ckpt, kind="dsf_conv", inner_dim=None)
    assert _error(ckpt) == (
        f"{ckpt / MANIFEST_NAME}: layer '{LAYER}' has kind 'dsf_conv'; from_pretrained loads the linear kinds "
        "['dsf', 'single'] only (load convolutions with dsf_runtime.conv); re-export the checkpoint"
    )


@pytest.mark.parametrize(("edit", "field", "expected"), [
    ({"num_hidden_layers": 10**6}, "num_hidden_layers", "2 (the layers the checkpoint's tensors are numbered for)"),
    ({"num_hidden_layers": 1}, "num_hidden_layers", "2 (the layers the checkpoint's tensors are numbered for)"),
    ({"num_attention_heads": 0}, "num_attention_heads", "a positive integer <= 2147483647"),
    ({"num_key_value_heads": 0}, "num_key_value_heads", "a positive integer <= 2147483647"),
    ({"num_attention_heads": 3, "head_dim": None}, "num_attention_heads", "a divisor of hidden_size 64"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "a divisor of num_attention_heads 4"),
    ({"hidden_size": -64}, "hidden_size", "a positive integer <= 2147483647"),
    ({"vocab_size": "128"}, "vocab_size", "a positive integer <= 2147483647"),
    ({"vocab_size": 2**63}, "vocab_size", "a positive integer <= 2147483647"),
    ({"rms_norm_eps": -1}, "rms_norm_eps", "a finite number > 0"),
    ({"rms_norm_eps": math.nan}, "rms_norm_eps", "a finite number > 0"),
    ({"pad_token_id": 10**9}, "pad_token_id", "null or a token id in [0, vocab_size 128)"),
    ({"model_type": "no-such-model"}, "model_type", "a model type this transformers version knows"),
])
def test_config_sanity(ckpt: Path, edit: dict, field: str, expected: str) -> None:
    _edit_json(ckpt / "config.json", lambda c: c.update(edit))
    start = time.perf_counter()
    message = _error(ckpt)
    assert time.perf_counter() - start < 10
    assert message == (f"{ckpt / 'config.json'}: '{field}' is {edit[field]!r}, expected {expected}; fix config.json "
                       "or re-export the checkpoint")


def test_bert_model_type(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", lambda c: c.update(model_type="bert", architectures=["BertLMHeadModel"]))
    message = _error(ckpt)
    assert message.startswith(f"{ckpt / MANIFEST_NAME}: layer 'model.layers.0.self_attn.q_proj' is not a Linear "
                              "[64, 64] of the BertLMHeadModel that config.json describes (model_type 'bert': "
                              "no such module)")


def test_file_mapped_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = build_tiny(tmp_path / "sharded", max_shard_bytes=20_000)
    files = json.loads((directory / INDEX_NAME).read_text())["weight_map"].values()
    calls = []
    real = checkpoint.safe_open

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", counting)
    from_pretrained(directory)
    assert len(set(files)) > 1
    assert sorted(calls) == sorted(set(files))


def test_checkpoint_closes_its_mappings(pristine: Path) -> None:
    with open_compressed(pristine) as ckpt:
        ckpt.load_layer(LAYER)
        assert ckpt._handles
    assert not ckpt._handles
