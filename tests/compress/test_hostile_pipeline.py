"""Hostile and broken inputs of the compression pipeline (issue 12): --overwrite never deletes the user's files,
dead writers' temporary files are cleaned, damaged resume state, a full disk, non-UTF-8 text and a --seqlen
beyond the model's context are clear errors naming the file and the fix. On a tiny random Llama (hidden 64)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import compress.output as output
from compress.api import CompressConfig, ConfigError, compress_model, resolve_model_dir
from compress.assets import load_text
from compress.output import PARTIAL_DIR, check_complete, prepare_output
from dsf_runtime.checkpoint import CheckpointError
from tests.dsf_runtime.helpers import tiny_llama

CONFIG = CompressConfig(method="wanda", density=0.5, samples=2, seqlen=16, device="cpu", batch_size=2)
DAMAGED = "the saved state of the unfinished run is damaged: pass --overwrite instead of --resume to start over"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from compress.assets import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


def _compress(out: Path, tokenizer, **kwargs) -> dict:
    model = tiny_llama(vocab_size=49152)
    return compress_model(kwargs.pop("config", CONFIG), out, model=model, tokenizer=tokenizer, progress=False,
                          **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer) -> Path:
    """An uninterrupted run's output."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _compress(out, tokenizer)
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tokenizer) -> Path:
    """An unfinished run with both blocks stored, killed before the final write."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr("compress.api.write_output", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        _compress(out, tokenizer)
    mp.undo()
    return out


def _assert_identical(out: Path, reference: Path) -> None:
    expected, got = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert not (out / PARTIAL_DIR).exists()


def test_overwrite_refuses_a_directory_with_the_users_files(tmp_path):
    for marker in ("dsf_manifest.json", PARTIAL_DIR):
        out = tmp_path / marker.strip(".")
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        (out / "thesis").mkdir()
        if marker == PARTIAL_DIR:
            (out / marker).mkdir()
        else:
            (out / marker).write_text("{}")
        with pytest.raises(FileExistsError) as info:
            prepare_output(out, {"a": 1}, resume=False, overwrite=True)
        assert str(info.value) == (
            f"output directory {out} holds files that dsf did not write (notes.txt, thesis); --overwrite only "
            "replaces a dsf output: move those files away or choose another --output"
        )
        assert sorted(p.name for p in out.iterdir()) == sorted([marker, "notes.txt", "thesis"])


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / PARTIAL_DIR).mkdir()
    (out / PARTIAL_DIR / "block-00000.safetensors").write_bytes(b"old")
    for name in ("iobs_rounds.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text("{}")
    written = sorted(p.name for p in out.iterdir())
    assert {"dsf_manifest.json", "config.json", "tokenizer.json", "compression_report.json"} <= set(written)
    partial = prepare_output(out, {"a": 1}, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL_DIR]
    assert sorted(p.name for p in partial.path.iterdir()) == ["state.json"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_writers_are_removed_on_resume(tmp_path, interrupted, tokenizer, reference):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / f".model.safetensors.tmp-{dead}", out / PARTIAL_DIR / f".block-00001.safetensors.tmp-{dead}"]
        kept = [out / f".model.safetensors.tmp-{live.pid}", out / f".notes.txt.tmp-{dead}",
                out / PARTIAL_DIR / f".state.json.tmp-{live.pid}"]
        for path in stale + kept:
            path.write_bytes(b"partial write")
        _compress(out, tokenizer, resume=True)
        assert [p.exists() for p in stale] == [False, False]
        assert [p.exists() for p in kept[:2]] == [True, True]  # .dsf-partial/ itself is gone: the run finished
    finally:
        live.kill()
        live.wait()
    for path in kept[:2]:
        path.unlink()
    _assert_identical(out, reference)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle(path: Path) -> None:
    torch.save({"W": torch.zeros(2)}, path)


def _swap(path: Path) -> None:
    other = path.with_name("block-00000.safetensors")
    tmp = path.with_name("swap")
    os.replace(path, tmp)
    os.replace(other, path)
    os.replace(tmp, other)


def _shrink(path: Path) -> None:
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k)[:-1] for k in f.keys()}
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    ("file", "damage", "problem"),
    [
        ("state.json", lambda p: p.write_text('{"format": "dsf-partial", '), "not valid JSON (Expecting"),
        ("state.json", lambda p: p.write_text("[]"), "not a dsf-partial state of version 1 with a 'config'"),
        ("state.json", Path.unlink, "missing"),
        ("block-00001.safetensors", _truncate, "not a results file written by dsf (SafetensorError: "),
        ("block-00001.safetensors", _pickle, "not a results file written by dsf (SafetensorError: "),
        ("block-00001.safetensors", lambda p: save_file({"x": torch.zeros(1)}, p),
         "not a results file written by dsf (KeyError: missing 'layers')"),
        ("block-00001.safetensors", _swap, "does not fit block 0: it lacks layer(s) ['model.layers.0.mlp.down_proj'"),
        ("block-00001.safetensors", _shrink, "does not fit block 1: the factors of 'model.layers.1.self_attn.q_proj'"),
    ],
)
def test_damaged_resume_state_names_the_file_and_the_fix(tmp_path, interrupted, tokenizer, file, damage, problem):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    damage(out / PARTIAL_DIR / file)
    with pytest.raises(ValueError) as info:
        _compress(out, tokenizer, resume=True)
    message = str(info.value)
    named = "block-00000.safetensors" if damage is _swap else file
    assert message.startswith(f"{out / PARTIAL_DIR / named}: {problem}"), message
    assert message.endswith(f"{DAMAGED} (or delete {out / PARTIAL_DIR})")
    _compress(out, tokenizer, overwrite=True)  # the fix works


def test_a_full_disk_is_a_clean_error_and_the_run_resumes_bit_identically(tmp_path, tokenizer, reference,
                                                                           monkeypatch):
    real = output.save_file

    def full_disk(tensors, path, metadata=None):
        if "block-00001" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    out = tmp_path / "out"
    monkeypatch.setattr(output, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        _compress(out, tokenizer)
    block = out / PARTIAL_DIR / "block-00001.safetensors"
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(block))
    assert info.value.strerror == (
        "No space left on device; free disk space (or fix the permissions), then re-run with --resume"
    )
    assert sorted(p.name for p in (out / PARTIAL_DIR).iterdir()) == ["block-00000.safetensors", "state.json"]

    monkeypatch.setattr(output, "save_file", real)
    monkeypatch.setattr(output, "save_compressed", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as info:
        _compress(out, tokenizer, resume=True)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(out))
    assert not (out / "dsf_manifest.json").exists()

    monkeypatch.undo()
    _compress(out, tokenizer, resume=True)
    _assert_identical(out, reference)


def test_text_that_is_not_utf8_names_the_file_and_the_fix(tmp_path, tokenizer):
    latin1 = tmp_path / "roman.txt"
    latin1.write_bytes("Il était une fois".encode("latin-1"))
    fix = "convert it (e.g. `iconv -f latin1 -t utf-8 roman.txt > roman-utf8.txt`) or pass a packaged text"
    with pytest.raises(ValueError) as info:
        load_text(latin1)
    assert str(info.value) == f"text file {latin1}: not UTF-8 (byte 0xe9 at offset 3); {fix}"
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"PK\x03\x04\x00\x00data")
    with pytest.raises(ValueError) as info:
        _compress(tmp_path / "out", tokenizer, config=CompressConfig(calibration=str(binary), device="cpu"))
    assert str(info.value) == (
        f"text file {binary}: a NUL byte at offset 4, a binary file rather than text; "
        "pass a UTF-8 text file or a packaged text"
    )
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one\r\ntwo\rthree\n")
    assert load_text(crlf) == crlf.read_text(encoding="utf-8") == "one\ntwo\nthree\n"
    assert not (tmp_path / "out").exists()


def test_seqlen_beyond_the_models_context(tmp_path, tokenizer):
    with pytest.raises(ConfigError) as info:
        _compress(tmp_path / "out", tokenizer, config=CompressConfig(seqlen=129, samples=1, device="cpu"))
    assert info.value.field == "seqlen"
    assert info.value.message == (
        "129 exceeds the context of model 'smollm2-135m' (max_position_embeddings = 128 in its config.json); "
        "use a seqlen of at most 128"
    )
    assert not (tmp_path / "out").exists()


def test_a_directory_without_its_manifest_is_refused_like_the_loader_does(tmp_path, reference):
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    check_complete(dense)  # a dense Hugging Face directory passes
    assert resolve_model_dir(dense) == dense
    for extra in ("model.safetensors", PARTIAL_DIR):
        broken = tmp_path / extra.strip(".")
        shutil.copytree(reference, broken)
        (broken / "dsf_manifest.json").unlink()
        if extra == PARTIAL_DIR:
            (broken / "model.safetensors").unlink()
            (broken / PARTIAL_DIR).mkdir()
        with pytest.raises(CheckpointError) as info:
            resolve_model_dir(broken)
        assert str(info.value) == (
            f"{broken / 'dsf_manifest.json'}: missing; the directory is incomplete (an interrupted write?) or not a "
            "compressed model; re-run `dsf compress` or `dsf export`"
        )
