"""``dsf compress-cnn`` on the packaged MNIST CNN with real digits: directory, report, errors (the ONNX export itself
is tested in tests/exporters/test_onnx_cnn.py)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from dsf_cli import commands_cnn
from dsf_runtime import open_compressed
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep the sub-command name with one command registered
    commands_cnn.register(app)
    return app


def test_compress_cnn_writes_directory_and_report(app, tmp_path) -> None:
    out = tmp_path / "mnist-basis"
    result = CliRunner().invoke(app, [
        "compress-cnn", "--network", "mnist", "--method", "basis", "--density", "0.3", "--calibration-images", "128",
        "--eval-images", "1000", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert open_compressed(out).layers["features.3"]["kind"] == "basis_conv"
    report = json.loads(result.output[result.output.index("{"):])
    assert report["compressed"]["conv_params"] < 0.35 * report["dense"]["conv_params"]
    assert report["dense"]["accuracy"] - report["compressed"]["accuracy"] < 0.05
    assert report["compressed"]["agreement"] > 0.9


def test_compress_cnn_errors_name_the_layer(app, tmp_path) -> None:
    result = CliRunner().invoke(app, [
        "compress-cnn", "--network", "mnist", "--layers", "features.1", "--calibration-images", "8",
        "--output", str(tmp_path / "x"), "--no-eval",
    ])
    assert result.exit_code == 1
    assert "layer 'features.1' is a ReLU, not a Conv2d" in result.output
    result = CliRunner().invoke(app, [
        "compress-cnn", "--network", "mnist", "--method", "basis", "--budget", "0.01", "--calibration-images", "8",
        "--output", str(tmp_path / "y"), "--no-eval",
    ])
    assert result.exit_code == 1 and "error: a budget of 187 cannot be met" in result.output
