"""Hypothesis mutation of a tiny real compressed directory (issue 12): header bytes, manifest fields, index entries,
index values inside the tensors and config fields. Every outcome is a CheckpointError/FormatError naming a file of
the directory, or a load whose logits are finite."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dsf_runtime import from_pretrained
from dsf_runtime.checkpoint import FILE_METADATA, INDEX_NAME, MANIFEST_NAME, CheckpointError
from dsf_runtime.formats import FormatError
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)
from tests.dsf_runtime.test_hostile_loader import build_tiny

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([2**31 - 1, 2**63, -(2**40), 10**6, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.just([]), st.just({}),
    st.lists(st.integers(-2, 200), max_size=3),
)
LAYER_FIELDS = ["kind", "method", "shape", "inner_dim", "nnz", "density", "bias", "error", "relative_error", "factors"]
FACTOR_FIELDS = ["shape", "layout", "dtype", "nnz", "index_dtype", "block_size", "bit_order"]
CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "pad_token_id", "model_type",
                 "max_position_embeddings", "tie_word_embeddings"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 2-layer Llama in csr, sharded (so it has an index)."""
    return build_tiny(tmp_path_factory.mktemp("fuzz") / "tiny", max_shard_bytes=40_000)


@pytest.fixture
def copy(pristine: Path) -> Iterator[Callable[[], Path]]:
    """A function returning a fresh copy of ``pristine`` per hypothesis example; all removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="dsf-fuzz-"))
    count = iter(range(10**9))
    yield lambda: Path(shutil.copytree(pristine, root / str(next(count))))
    shutil.rmtree(root)


def _outcome(directory: Path) -> None:
    """A CheckpointError/FormatError naming a file of ``directory``, or a model whose logits are finite."""
    try:
        model = from_pretrained(directory)
    except (CheckpointError, FormatError) as exc:
        assert str(exc).startswith(str(directory)), str(exc)
        event(f"refused: {Path(str(exc).split(':', 1)[0]).name}")
        return
    event("loaded")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert bool(torch.isfinite(logits).all())


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*.safetensors"))


@SETTINGS
@given(data=st.data())
def test_header_bytes(copy, data) -> None:
    directory = copy()
    path = data.draw(st.sampled_from(_shards(directory)))
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, 8 + length - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    _outcome(directory)


@SETTINGS
@given(data=st.data(), value=JSON_VALUES)
def test_manifest_fields(copy, data, value) -> None:
    directory = copy()
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    fqn = data.draw(st.sampled_from(sorted(manifest["layers"])))
    entry = manifest["layers"][fqn]
    if data.draw(st.booleans()):
        entry[data.draw(st.sampled_from(LAYER_FIELDS))] = value
    else:
        entry["factors"][data.draw(st.sampled_from(sorted(entry["factors"])))][
            data.draw(st.sampled_from(FACTOR_FIELDS))] = value
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    _outcome(directory)


@SETTINGS
@given(data=st.data())
def test_index_and_index_values(copy, data) -> None:
    directory = copy()
    if data.draw(st.booleans()):
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
        name = data.draw(st.sampled_from(sorted(weight_map)))
        value = data.draw(st.one_of(st.sampled_from([p.name for p in _shards(directory)]), st.none(),
                                    st.just("../config.json"), st.just(MANIFEST_NAME)))
        _edit_json(directory / INDEX_NAME, lambda i: i["weight_map"].update({name: value}))
    else:
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
        name = data.draw(st.sampled_from(sorted(n for n in weight_map if n.endswith((".col_idx", ".row_ptr")))))
        path = directory / weight_map[name]
        tensors = load_file(path)
        position = data.draw(st.integers(0, tensors[name].numel() - 1))
        info = torch.iinfo(tensors[name].dtype)
        tensors[name].view(-1)[position] = data.draw(st.integers(info.min, info.max))
        save_file(tensors, path, metadata=FILE_METADATA)
    _outcome(directory)


@SETTINGS
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON_VALUES)
def test_config_fields(copy, field: str, value) -> None:
    directory = copy()
    _edit_json(directory / "config.json", lambda c: c.update({field: value}))
    _outcome(directory)
