"""Malformed ``ai.dsf`` models in ONNX Runtime (issue 12): bad initializers and attributes are a clear error from
make_session naming the file and node, never a crash or a silent wrong result; unreadable files are an error naming
the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dsf_runtime import CompressedLayer
from exporters.config import ExportConfig
from exporters.onnx_export import layer_model
from exporters.onnx_ops import make_session
from tests.exporters.conftest import sparse

OUT, INNER, IN = 37, 29, 45


def _model(layout: str = "csr") -> onnx.ModelProto:
    g = torch.Generator().manual_seed(5)
    factors = {"A": sparse(OUT, INNER, 0.3, g), "B": sparse(INNER, IN, 0.3, g)}
    layer = CompressedLayer.from_dense("dsf", factors, method="t")
    return layer_model(layer, ExportConfig(layout=layout, block_size=16))


def _set(model: onnx.ModelProto, name: str, edit) -> None:
    init = next(t for t in model.graph.initializer if t.name == name)
    array = onnx.numpy_helper.to_array(init).copy()
    edit(array)
    init.CopyFrom(onnx.numpy_helper.from_array(array, name))


def _attr(model: onnx.ModelProto, **attrs) -> None:
    node = model.graph.node[0]
    for name, value in attrs.items():
        old = next(a for a in node.attribute if a.name == name)
        old.CopyFrom(onnx.helper.make_attribute(name, value))


def _error(model: onnx.ModelProto, tmp_path: Path) -> str:
    """make_session's error for ``model``: raised before any session runs (a Python exception inside an
    onnxruntime-extensions kernel would end the process)."""
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ValueError) as info:
        make_session(path)
    message = str(info.value)
    assert message.startswith(f"{path}: node 'linear': ai.dsf::DSFLinear: "), message
    assert message.endswith("; re-export it with `dsf export --onnx`"), message
    return message


def _last(a: np.ndarray, v) -> None:
    a[-1] = v


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("A.row_ptr", lambda a: a.__setitem__(1, 10**6), "'A.row_ptr' decreases at row 1"),
    ("A.row_ptr", lambda a: _last(a, a[-1] + 5), "'A.row_ptr' ends at"),
    ("B.row_ptr", lambda a: _last(a, 2**31 - 1), "'B.row_ptr' ends at 2147483647"),
    ("B.col_idx", lambda a: a.__setitem__(0, 32767), "'B.col_idx' holds column 32767"),
    ("B.col_idx", lambda a: a.__setitem__(0, -1), "'B.col_idx' holds column -1"),
    ("B.col_idx", lambda a: a.__setitem__(0, IN), f"'B.col_idx' holds column {IN}"),
])
def test_malformed_csr_initializers(tmp_path: Path, name: str, edit, message: str) -> None:
    model = _model()
    _set(model, name, edit)
    assert message in _error(model, tmp_path)


def test_bitmask_popcount(tmp_path: Path) -> None:
    model = _model("bitmask")
    _set(model, "A.bitmask", lambda a: a.__setitem__((0, 0), 0xFF))
    assert "ai.dsf::DSFLinear: input 'A.bitmask'" in _error(model, tmp_path)


@pytest.mark.parametrize(("attrs", "message"), [
    ({"in_features": IN + 3}, f"X has {IN} features, but in_features is {IN + 3}"),
    ({"out_features": OUT + 4}, "'A.row_ptr'"),
    ({"inner_dim": 3}, "input 'A.col_idx' holds column"),
    ({"inner_dim": 0}, "attribute inner_dim is 0, expected a positive integer"),
    ({"layout": "bitmask"}, "'A."),
    ({"layout": "coo"}, "layout attribute 'coo' is not one of ['bitmask', 'bsr', 'csr']"),
])
def test_attributes_that_contradict_the_inputs(tmp_path: Path, attrs: dict, message: str) -> None:
    model = _model()
    _attr(model, **attrs)
    assert message in _error(model, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_unreadable_onnx_file_names_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.onnx"
    data = _model().SerializeToString()
    path.write_bytes({"truncate": data[: len(data) // 3], "random": np.random.default_rng(0).bytes(4096),
                      "empty": b""}[damage])
    with pytest.raises(ValueError) as info:
        make_session(path)
    assert str(info.value).startswith(f"{path}: ")
    assert str(info.value).endswith("; re-export it with `dsf export --onnx`")
