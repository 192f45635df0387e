"""``dsf export``: the flags reach the exporters, and bad input gives the promised error text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dsf_cli.main import app
from dsf_runtime import from_pretrained, open_compressed
from exporters.onnx_generate import prefill_feed


def _export(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["export", *map(str, args)])
    return result.exit_code, result.output


def test_layout_export(compressed_dir: Path, tmp_path: Path) -> None:
    code, output = _export(compressed_dir, "--output", tmp_path / "out", "--layout", "bsr", "--block-size", "64",
                           "--dtype", "float16")
    assert code == 0 and output.splitlines()[0] == f"wrote {tmp_path / 'out'}"
    factor = open_compressed(tmp_path / "out").layers["model.layers.0.mlp.down_proj"]["factors"]["A"]
    assert (factor["layout"], factor["block_size"], factor["dtype"]) == ("bsr", 64, "float16")


def test_default_export_is_compact_and_reports_its_size(compressed_dir: Path, tmp_path: Path) -> None:
    code, output = _export(compressed_dir, "--output", tmp_path / "out", "--dtype", "float16")
    assert code == 0 and "warning" not in output
    with open_compressed(tmp_path / "out") as ckpt:
        size = ckpt.size_summary()
        layouts = {f["layout"] for e in ckpt.layers.values() for f in e["factors"].values()}
    assert layouts <= {"bitmask", "csr", "dense"} and size["linear_ratio"] < 0.8
    assert f"= {size['ratio']:.3f}x the dense fp16 model" in output
    files = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert abs(files - size["total_bytes"]) < 64 * 1024  # the headers are the difference


def test_export_larger_than_dense_warns_with_the_fix(compressed_dir: Path, tmp_path: Path) -> None:
    code, output = _export(compressed_dir, "--output", tmp_path / "out", "--layout", "dense", "--dtype", "float32",
                          "--embedding", "keep")
    assert code == 0
    assert (f"is larger than the same model dense in fp16; export it with `dsf export {tmp_path / 'out'} -o OUT "
            "--layout auto --dtype float16`") in output


def test_dense_fallback(compressed_dir: Path, tmp_path: Path) -> None:
    code, _ = _export(compressed_dir, "--output", tmp_path / "hf", "--dense-fallback")
    assert code == 0 and not (tmp_path / "hf" / "dsf_manifest.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())


@pytest.mark.slow
def test_onnx_standard_lowering_end_to_end(compressed_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    code, output = _export(compressed_dir, "--onnx", out, "--layout", "bitmask", "--lowering", "standard")
    assert (code, output.strip().splitlines()[-1]) == (0, f"wrote {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 49152, (2, 6), dtype=np.int64)
    with torch.no_grad():
        want = from_pretrained(compressed_dir)(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    got = session.run(["logits"], prefill_feed(session, ids))[0]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "pass exactly one of --output DIR and --onnx FILE"),
        (("--onnx", "{tmp}/m.onnx", "--dense-fallback"), "--dense-fallback writes a directory: pass --output DIR"),
        (("--onnx", "{tmp}/m.onnx", "--layout", "dense"),
         "--layout 'dense' has no ONNX encoding; use one of bitmask, bsr, csr"),
        (("--onnx", "{tmp}/m.onnx", "--dtype", "bfloat16"),
         "--dtype 'bfloat16' is not supported by the ONNX export; use float32 or float16"),
        (("--onnx", "{tmp}/m.onnx", "--opset", "17"), "--opset 17 is too old; the export needs opset >= 18"),
        (("--output", "{tmp}/out", "--max-shard-size", "big"),
         "--max-shard-size 'big' is not a size; use e.g. 2GiB, 500MB or a number of bytes"),
    ],
)
def test_bad_flags_fail_with_their_name(compressed_dir: Path, tmp_path: Path, args: tuple, message: str) -> None:
    code, output = _export(compressed_dir, *(a.format(tmp=tmp_path) for a in args))
    assert (code, output.strip()) == (1, f"error: {message}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flag", "value"), [("--layout", "coo"), ("--block-size", "48"), ("--lowering", "fast")])
def test_values_outside_the_choices_are_rejected_by_name(compressed_dir: Path, tmp_path: Path, flag, value) -> None:
    code, output = _export(compressed_dir, "--output", tmp_path / "out", flag, value)
    assert code == 2 and f"Invalid value for '{flag}'" in output


def test_broken_source_gives_the_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    code, output = _export(tmp_path / "src", "--output", tmp_path / "out")
    assert code == 1
    assert output.startswith(f"error: {tmp_path / 'src' / 'dsf_manifest.json'}: missing; the directory is incomplete")
    assert not (tmp_path / "out").exists()
