"""ONNX export of the 2-block SmolLM2 with random factors: ``ai.dsf`` nodes and the standard lowering, run by ONNX
Runtime and compared with the compressed model in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import exporters.onnx_export
from dsf_runtime import from_pretrained, open_compressed
from exporters.config import ExportConfig
from exporters.onnx_export import export_onnx, prepare_for_onnx, verify_onnx
from exporters.onnx_generate import greedy_generate_onnx, prefill_feed
from exporters.onnx_lowering import lower_to_standard
from exporters.onnx_ops import DOMAIN, make_session

pytestmark = pytest.mark.slow  # one real export (~15 s)

SHAPES = [(1, 5), (3, 11)]  # neither is the traced example (2, 8): batch and sequence are dynamic


@pytest.fixture(scope="module")
def exported(compressed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(compressed_dir, tmp_path_factory.mktemp("onnx") / "smollm2.onnx", ExportConfig(layout="csr"))


@pytest.fixture(scope="module")
def reference(compressed_dir: Path):
    model = from_pretrained(compressed_dir)

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()

    return logits


def _ids(batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(batch * 100 + seq).integers(0, 49152, (batch, seq), dtype=np.int64)


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def _assert_parity(session: ort.InferenceSession, reference) -> None:
    for shape in SHAPES:
        ids = _ids(*shape)
        got, want = session.run(["logits"], prefill_feed(session, ids))[0], reference(ids)
        assert got.shape == want.shape == (*shape, 49152)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_custom_op_export_is_valid_compact_and_matches_torch(exported: Path, compressed_dir: Path, reference) -> None:
    onnx.checker.check_model(str(exported), full_check=True)
    assert exported.with_name("smollm2.onnx.data").is_file()
    model = onnx.load(str(exported), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}
    assert [v.name for v in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert dims["input_ids"] == dims["position_ids"] == ["batch", "sequence"] and dims["attention_mask"][0] == "batch"
    assert dims["logits"] == ["batch", "sequence", 49152]
    assert dims["past_key_values.1.value"] == ["batch", 3, "past", 64]  # SmolLM2: 3 KV heads of 64
    assert dims["present.1.value"][:2] == ["batch", 3] and dims["present.1.value"][3] == 64
    assert len(model.graph.input) == 3 + 2 * 2 and len(model.graph.output) == 1 + 2 * 2
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    layers = open_compressed(compressed_dir).layers
    assert sorted(n.op_type for n in nodes) == sorted(
        "DSFLinear" if entry["kind"] == "dsf" else "SparseLinear" for entry in layers.values()
    )
    types = {t.name: t.data_type for t in model.graph.initializer}
    for fqn in layers:
        assert f"{fqn}.weight" not in types
        for factor in ("A", "B") if layers[fqn]["kind"] == "dsf" else ("W",):
            assert types[f"{fqn}.{factor}.values"] == onnx.TensorProto.FLOAT
            assert types[f"{fqn}.{factor}.col_idx"] == onnx.TensorProto.INT16
            assert types[f"{fqn}.{factor}.row_ptr"] == onnx.TensorProto.INT32
    _assert_parity(make_session(exported, session_options=_options()), reference)


@pytest.mark.parametrize("lowering", ["custom", "standard"])
def test_onnx_generates_the_torch_tokens(exported: Path, compressed_dir: Path, lowering: str) -> None:
    """20 greedy tokens through ONNX Runtime, feeding present back as past, equal torch's greedy tokens."""
    if lowering == "custom":
        session = make_session(exported, session_options=_options())
    else:
        path = exported.with_name("generate-standard.onnx")  # shares smollm2.onnx.data
        onnx.save_model(lower_to_standard(onnx.load(str(exported), load_external_data=False)), str(path))
        session = ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])
    ids = _ids(1, 7)
    got = greedy_generate_onnx(session, ids, 20)
    model = from_pretrained(compressed_dir)
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert got.shape == (1, 27) and got.tolist() == want.tolist()


def test_standard_lowering_runs_on_stock_onnx_runtime(exported: Path, reference) -> None:
    lowered = lower_to_standard(onnx.load(str(exported), load_external_data=False))
    path = exported.with_name("standard.onnx")  # shares smollm2.onnx.data
    onnx.save_model(lowered, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    assert DOMAIN not in {o.domain for o in lowered.opset_import}
    _assert_parity(ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"]), reference)


def test_existing_output_is_refused_before_any_work(exported: Path, compressed_dir: Path) -> None:
    before = exported.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"smollm2.onnx already exists and is not empty; pass --overwrite"):
        export_onnx(compressed_dir, exported)
    assert exported.stat().st_mtime_ns == before


def test_a_failed_export_leaves_nothing_behind(compressed_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(exporters.onnx_export.torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx(compressed_dir, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_self_check_compares_with_torch(exported: Path, compressed_dir: Path) -> None:
    model = from_pretrained(compressed_dir)
    prepare_for_onnx(model, ExportConfig(layout="csr"))
    model.config.use_cache = False
    assert verify_onnx(exported, model) < 1e-3
    with torch.no_grad():
        model.model.norm.weight.mul_(3)
    with pytest.raises(ValueError, match=rf"{exported}: the exported model's logits differ from torch's by .* on 4 "
                                         "tokens; the export is wrong, report this as a bug"):
        verify_onnx(exported, model)


def test_self_check_runs_the_checker(exported: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    proto = onnx.load(str(exported), load_external_data=False)
    proto.graph.node[0].input.append("no_such_value")
    onnx.save_model(proto, str(broken))
    with pytest.raises(ValueError, match=rf"{broken}: the exported model fails onnx.checker"):
        verify_onnx(broken, torch.nn.Module())
