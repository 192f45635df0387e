"""Hostile and broken inputs through the `dsf` command line (issue 12): every user error is one `error:` line on
stderr, never a traceback (unless --debug or DSF_DEBUG=1); the commands refuse a directory whose manifest is
missing, a dense directory where a compressed one is needed, a --seqlen beyond the model's context, CUDA without
CUDA, non-UTF-8 text and a corrupt tokenizer.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from dsf_cli.common import set_debug, user_errors
from dsf_cli.main import app
from dsf_runtime import save_compressed
from tests.dsf_runtime.helpers import compress_randomly, tiny_llama, uncompressed

runner = CliRunner()
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
MISSING = ("missing; the directory is incomplete (an interrupted write?) or not a compressed model; re-run "
           "`dsf compress` or `dsf export`")


def _invoke(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def _one_error_line(result, status: int) -> str:
    """The message of a failed command's one ``error:`` line on stderr, after checking its exit status and that
    it printed no traceback."""
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny dense Llama directory with the packaged SmolLM2 tokenizer (max_position_embeddings 128)."""
    from compress.assets import smollm2_dir

    directory = tmp_path_factory.mktemp("dense")
    tiny_llama(vocab_size=49152).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, dense) -> Path:
    model = tiny_llama(vocab_size=49152)
    layers = compress_randomly(model, "bitmask")
    out = tmp_path_factory.mktemp("compressed") / "out"
    return save_compressed(out, tensors=uncompressed(model, layers), layers=layers, config_source=dense)


def test_user_errors_are_one_line_and_debug_shows_the_traceback():
    demo = typer.Typer()

    @demo.callback()
    def main(debug: bool = typer.Option(False, "--debug")) -> None:
        """A group with the --debug flag."""
        set_debug(debug)

    @demo.command("read")
    @user_errors
    def read(kind: str) -> None:
        if kind == "missing":
            raise FileNotFoundError(2, "No such file or directory", "/data/x.txt")
        raise KeyError("a bug, not a user error")

    result = runner.invoke(demo, ["read", "missing"])
    assert result.exit_code == 2 and result.stderr == "error: /data/x.txt: No such file or directory\n"
    assert isinstance(runner.invoke(demo, ["read", "bug"]).exception, KeyError)
    assert isinstance(runner.invoke(demo, ["--debug", "read", "missing"]).exception, FileNotFoundError)
    result = runner.invoke(demo, ["read", "missing"], env={"DSF_DEBUG": "1"})
    assert isinstance(result.exception, FileNotFoundError)


def test_debug_flag_and_every_command_is_guarded(compressed):
    import typer.main

    def callbacks(group: typer.Typer):
        for info in group.registered_commands:
            yield info.callback
        for sub in group.registered_groups:
            yield from callbacks(sub.typer_instance)

    assert all(getattr(c, "__dsf_user_errors__", False) for c in callbacks(app))
    assert "--debug" in [p.opts[0] for p in typer.main.get_command(app).params]
    result = _invoke("run", "--model", compressed, "--prompt", "Hi", "--device", "gpu0")
    assert _one_error_line(result, 2).startswith("--device 'gpu0' is not a device (")
    assert _one_error_line(result, 2).endswith("); use cpu, cuda or cuda:N")
    result = _invoke("--debug", "run", "--model", compressed, "--prompt", "Hi", "--device", "gpu0")
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


@NO_CUDA
def test_cuda_without_a_gpu_is_a_clean_error(compressed, dense):
    message = "--device cuda: CUDA requested but torch sees no CUDA device; use --device cpu"
    result = _invoke("run", "--model", compressed, "--prompt", "Hi", "--device", "cuda")
    assert _one_error_line(result, 2) == message
    result = _invoke("run", "--model", compressed, "--prompt", "Hi", "--device", "cuda", "--dense-baseline")
    assert _one_error_line(result, 2) == message
    assert _one_error_line(_invoke("bench", "e2e", "--model", compressed, "--device", "cuda"), 2) == message
    assert _one_error_line(_invoke("eval", "--model", dense, "--device", "cuda"), 1) == message


def test_a_dense_directory_given_to_a_compressed_only_command(tmp_path, dense):
    """`dsf inspect` and `dsf export` name a dense Hugging Face directory as dense, with the fix; not as an
    interrupted write."""
    message = (f"{dense}: a dense Hugging Face checkpoint (config.json and weights, no dsf_manifest.json), not a "
               f"compressed directory; compress it with `dsf compress --model {dense} -o OUT`, or use it as the dense "
               "baseline (`dsf run --model DIR --baseline DENSE_DIR`)")
    assert _one_error_line(_invoke("inspect", dense), 1) == message
    assert _one_error_line(_invoke("inspect", dense, "--json"), 1) == message
    assert _one_error_line(_invoke("export", dense, "-o", tmp_path / "out"), 1) == message
    assert _one_error_line(_invoke("export", dense, "--onnx", tmp_path / "m.onnx"), 1) == message
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_corrupt_tokenizer_json_in_run(tmp_path, compressed):
    broken = tmp_path / "broken"
    shutil.copytree(compressed, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    result = _invoke("run", "--model", broken, "--prompt", "Hi", "--device", "cpu")
    assert _one_error_line(result, 2) == (
        f"{broken / 'tokenizer.json'}: the tokenizer does not load (JSONDecodeError: Expecting property name "
        "enclosed in double quotes: line 1 column 30 (char 29)); copy the tokenizer files (tokenizer.json, "
        "tokenizer_config.json, ...) from the base model again"
    )


def test_every_reader_refuses_a_directory_without_its_manifest(tmp_path, compressed, dense):
    broken = tmp_path / "broken"
    shutil.copytree(compressed, broken)
    (broken / "dsf_manifest.json").unlink()
    message = f"{broken / 'dsf_manifest.json'}: {MISSING}"
    assert _one_error_line(_invoke("run", "--model", broken, "--prompt", "Hi"), 2) == message
    for args in (["eval", "--model", broken, "--device", "cpu"], ["compress", "--model", broken, "--output", tmp_path]):
        assert _one_error_line(_invoke(*args), 1) == message
    assert _one_error_line(_invoke("inspect", broken), 1) == message
    result = _invoke("eval", "--model", dense, "--seqlen", "32", "--max-windows", "1", "--device", "cpu",
                     "--no-progress")
    assert result.exit_code == 0 and "perplexity" in result.output, result.output


def test_seqlen_beyond_the_models_context(tmp_path, dense):
    message = (f"--seqlen: 129 exceeds the context of model '{dense}' (max_position_embeddings = 128 in its "
               "config.json); use a seqlen of at most 128")
    assert _one_error_line(_invoke("eval", "--model", dense, "--seqlen", 129, "--device", "cpu"), 1) == message
    result = _invoke("compress", "--model", dense, "--seqlen", 129, "--device", "cpu", "--output", tmp_path / "o")
    assert _one_error_line(result, 1) == message
    assert not (tmp_path / "o").exists()


def test_text_that_is_not_utf8(tmp_path, dense):
    latin1 = tmp_path / "notes.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    result = _invoke("eval", "--model", dense, "--text", latin1, "--seqlen", "32", "--device", "cpu")
    assert _one_error_line(result, 1) == (
        f"text file {latin1}: not UTF-8 (byte 0xe9 at offset 3); convert it (e.g. `iconv -f latin1 -t utf-8 "
        "notes.txt > notes-utf8.txt`) or pass a packaged text"
    )


def test_compress_overwrite_keeps_the_users_files(tmp_path, dense):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dsf_manifest.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    result = _invoke("compress", "--model", dense, "--seqlen", "16", "--samples", "1", "--device", "cpu",
                     "--output", out, "--overwrite", "--no-progress")
    assert _one_error_line(result, 1) == (
        f"output directory {out} holds files that dsf did not write (thesis.tex); --overwrite only replaces a dsf "
        "output: move those files away or choose another --output"
    )
    assert (out / "thesis.tex").read_text() == "years of work"
