"""ONNX export of compressed CNNs with standard operators: ONNX Runtime matches torch for every conv kind
(asymmetric padding and a dynamic batch included), and a real compressed MNIST CNN exports after a reload."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.conv import CNNCompressConfig, compress_cnn, save_cnn
from compress.conv.data import mnist_digits
from compress.conv.models import mnist_cnn
from dsf_runtime.conv import load_compressed_into, replace_conv
from exporters.onnx_cnn import export_cnn_onnx
from tests.dsf_runtime.test_conv import Tiny, _layers


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_every_kind_matches_onnx_runtime(tmp_path) -> None:
    model = Tiny()
    replace_conv(model, _layers(model, "csr"))
    model.eval()
    path = export_cnn_onnx(model, tmp_path / "tiny.onnx", torch.randn(2, 4, 9, 9))
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    assert {node.domain for node in proto.graph.node} <= {""}
    assert ops.count("Conv") == 5 and "Concat" in ops and "Gather" in ops  # the asymmetric Pad folds into Conv
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 4, 9, 9, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_run(path, x), expected, rtol=1e-4, atol=1e-5)


def test_real_compressed_cnn_reloads_and_exports(tmp_path) -> None:
    digits = mnist_digits()[0][torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:192]]
    config = CNNCompressConfig(method="dsf", density=0.3, dsf_options={"iters": 20, "finalize_iters": 20})
    result = compress_cnn(mnist_cnn(), config, [digits[:128]])
    save_cnn(tmp_path / "mnist-dsf", result, base_model="ccexam-mnist")
    model = load_compressed_into(mnist_cnn(), tmp_path / "mnist-dsf")
    path = export_cnn_onnx(model, tmp_path / "mnist.onnx", digits[:2])
    x = digits[128:]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(path, x), expected, rtol=1e-4, atol=1e-4)
    assert (_run(path, x).argmax(1) == expected.argmax(1)).all()


def test_export_errors(tmp_path) -> None:
    model = Tiny().eval()
    with pytest.raises(ValueError, match="^opset 17 is too old; the CNN export needs opset >= 18$"):
        export_cnn_onnx(model, tmp_path / "a.onnx", torch.randn(2, 4, 9, 9), opset=17)
    with pytest.raises(ValueError, match=r"^example has shape \[1, 4, 9, 9\]; pass a batch of at least 2 inputs$"):
        export_cnn_onnx(model, tmp_path / "a.onnx", torch.randn(1, 4, 9, 9))
    (tmp_path / "b.onnx").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite to replace it$"):
        export_cnn_onnx(model, tmp_path / "b.onnx", torch.randn(2, 4, 9, 9))
