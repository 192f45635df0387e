"""One compressed layer as ONNX: the ``ai.dsf`` Python kernels and the standard lowering against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsf_runtime import CompressedLayer
from exporters.config import ExportConfig
from exporters.layouts import convert_layer
from exporters.onnx_export import layer_model
from exporters.onnx_lowering import lower_to_standard
from exporters.onnx_ops import DOMAIN, make_session
from tests.exporters.conftest import sparse

SHAPES = {"dsf": (37, 45), "single": (45, 37)}  # odd sizes: bsr pads, bitmask has padding bits


def _layer(kind: str, *, bias: bool = False) -> CompressedLayer:
    g = torch.Generator().manual_seed(3)
    out, inp = SHAPES[kind]
    b = torch.randn(out, generator=g) if bias else None
    if kind == "single":
        return CompressedLayer.from_dense("single", {"W": sparse(out, inp, 0.4, g)}, method="t", bias=b)
    a, bf = sparse(out, 29, 0.3, g), sparse(29, inp, 0.3, g)
    a[:, 4] = 0  # an empty inner index, dropped by the packed layouts
    return CompressedLayer.from_dense("dsf", {"A": a, "B": bf}, method="t", bias=b)


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", ["csr", "bitmask", "bsr"])
@pytest.mark.parametrize("kind", ["dsf", "single"])
def test_custom_op_and_standard_lowering_match_torch(tmp_path: Path, kind: str, layout: str, dtype: str) -> None:
    config = ExportConfig(layout=layout, dtype=dtype, block_size=16)
    layer = _layer(kind, bias=kind == "single")
    packed = convert_layer(layer, config)
    x = torch.randn(5, SHAPES[kind][1], generator=torch.Generator().manual_seed(4)).to(config.torch_dtype)
    expected = x.float() @ packed.weight(torch.float32).T + (0 if packed.bias is None else packed.bias.float())
    tol = 1e-5 if dtype == "float32" else 2e-3 * expected.abs().max().item()
    model = layer_model(layer, config)
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == (DOMAIN, "DSFLinear" if kind == "dsf" else "SparseLinear")
    custom = make_session(_save(model, tmp_path / "custom.onnx"), session_options=_options())
    y = custom.run(None, {"x": x.numpy()})[0]
    assert y.dtype == x.numpy().dtype
    np.testing.assert_allclose(y.astype(np.float32), expected.numpy(), rtol=0, atol=tol)
    lowered = _save(lower_to_standard(model), tmp_path / "standard.onnx")
    assert all(n.domain == "" for n in onnx.load(str(lowered)).graph.node)
    stock = ort.InferenceSession(str(lowered), _options(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(stock.run(None, {"x": x.numpy()})[0].astype(np.float32), expected.numpy(),
                               rtol=0, atol=tol)


def test_node_carries_the_packed_arrays_in_their_own_dtypes() -> None:
    model = layer_model(_layer("dsf"), ExportConfig(layout="csr", dtype="float16"))
    types = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    assert types == {"A.values": np.float16, "A.col_idx": np.int16, "A.row_ptr": np.int32,
                     "B.values": np.float16, "B.col_idx": np.int16, "B.row_ptr": np.int32}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs == {"layout": b"csr", "out_features": 37, "in_features": 45, "inner_dim": 28, "block_size": 0}
    bitmask = layer_model(_layer("single"), ExportConfig(layout="bitmask"))
    mask = next(t for t in bitmask.graph.initializer if t.name == "W.bitmask")
    assert (mask.data_type, list(mask.dims)) == (onnx.TensorProto.UINT8, [45, 5])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["dsf", "single"])
def test_onnx_runtime_folds_the_standard_lowering_to_one_dense_weight(tmp_path: Path, kind: str, dtype: str) -> None:
    model = lower_to_standard(layer_model(_layer(kind), ExportConfig(layout="bitmask", dtype=dtype)))
    path = _save(model, tmp_path / "s.onnx")
    options = _options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    # x86 ONNX Runtime has no float16 MatMul: it computes in float32 between casts, with a float32 weight.
    ops = ["MatMul"] if dtype == "float32" else ["Cast", "MatMul", "Cast"]
    assert [n.op_type for n in optimized.graph.node] == ops
    out, inp = SHAPES[kind]
    weights = [(list(t.dims), t.data_type) for t in optimized.graph.initializer]
    assert weights == [([inp, out], onnx.TensorProto.FLOAT)]  # Wᵀ, dense


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ExportConfig(layout="dense"), "--layout 'dense' has no ONNX encoding; use one of bitmask, bsr, csr"),
        (ExportConfig(layout="bitmask", dtype="bfloat16"), "--dtype 'bfloat16' is not supported by the ONNX export; use float32 or float16"),
    ],
)
def test_layouts_and_dtypes_without_onnx_encoding_name_their_flag(config: ExportConfig, message: str) -> None:
    with pytest.raises(ValueError) as info:
        layer_model(_layer("single"), config)
    assert str(info.value) == message


def test_standard_lowering_needs_opset_18() -> None:
    model = layer_model(_layer("single"))
    model.opset_import[0].version = 17
    with pytest.raises(ValueError, match=r"--lowering standard needs opset >= 18 \(BitwiseAnd\), the model has 17"):
        lower_to_standard(model)


def test_initializer_factors_stay_resident_until_the_session_goes(tmp_path: Path) -> None:
    """make_session keeps validated initializer factors as torch tensors (no per-call copies) and frees them with
    the session."""
    import gc

    from exporters import onnx_ops

    before = set(onnx_ops._RESIDENT)
    model = layer_model(_layer("dsf"), ExportConfig(layout="csr"))
    session = make_session(_save(model, tmp_path / "m.onnx"), session_options=_options())
    added = set(onnx_ops._RESIDENT) - before
    assert len(added) == 1 and [f.layout for f in onnx_ops._RESIDENT[added.pop()]] == ["csr", "csr"]
    x = np.ones((2, SHAPES["dsf"][1]), np.float32)
    assert session.run(None, {"x": x})[0].shape == (2, SHAPES["dsf"][0])
    del session
    gc.collect()
    assert set(onnx_ops._RESIDENT) == before


def test_factors_computed_at_run_time_are_checked_per_call(tmp_path: Path) -> None:
    """A node whose values come from another node (not an initializer) keeps its inputs and the per-call kernel."""
    config = ExportConfig(layout="csr")
    layer = _layer("dsf")
    model = layer_model(layer, config)
    node = model.graph.node[0]
    node.input[1] = "A.values_computed"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", ["A.values"], ["A.values_computed"]))
    session = make_session(_save(model, tmp_path / "m.onnx"), session_options=_options())
    x = torch.randn(3, SHAPES["dsf"][1], generator=torch.Generator().manual_seed(6))
    expected = x @ convert_layer(layer, config).weight(torch.float32).T
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected.numpy(), rtol=0, atol=1e-5)
