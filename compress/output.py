"""The compression output directory and the resumable state of an unfinished run.

While a run is in progress, ``<out>/.dsf-partial/`` holds:

* ``state.json``: ``{"format": "dsf-partial", "version": 1, "config": {...}}``, the fingerprint of everything
  that determines the factors (model, text, method, density, solver options, samples, seqlen, seed, ...);
* ``block-00003.safetensors``: the factors of every linear of finished block 3 (``<fqn>.A``/``<fqn>.B`` or
  ``<fqn>.W``, fp32) with their errors in the file's metadata, written to a temporary name
  (``.<name>.tmp-<pid>``, like every writer here) and renamed;
* model-level I-OBS (``compress.iobs_model``) adds its round checkpoints: ``iobs-state.json``, the weights after
  the last finished round and the best round's results.

When every block is finished, ``write_output`` writes ``compression_report.json`` and then the compressed model
through ``dsf_runtime.checkpoint.save_compressed`` (whose manifest comes last), and removes the partial state.

A damaged partial state (a truncated, foreign or swapped block file, a corrupt ``state.json``) is an error naming
the file and the fix; a failed write (e.g. a full disk) is an ``OSError`` naming the file, and leaves the state as
it was, so the run resumes once the cause is fixed. Temporary files of writers that died are removed when a run
resumes or overwrites; ``--overwrite`` removes only what a run writes and refuses a directory holding anything else.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from compress.architectures import ArchitectureSpec, decoder_blocks
from compress.evaluate import layer_error_report
from compress.quantize import FORMATS as QUANTIZED_FORMATS, codes_of, quantize_embedding
from compress.solvers.base import SolveResult
from dsf_runtime.checkpoint import (
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_FILE,
    CompressedLayer,
    open_compressed,
    save_compressed,
)
from dsf_runtime.quantized import input_embedding_name

__all__ = [
    "PARTIAL_DIR",
    "REPORT_FILE",
    "PartialRun",
    "check_complete",
    "prepare_output",
    "read_layer_errors",
    "remove_stale_temp_files",
    "write_json_atomic",
    "write_output",
]

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".dsf-partial"
REPORT_FILE = "compression_report.json"
_STATE_FILE = "state.json"
_STATE_FORMAT = "dsf-partial"
_STATE_VERSION = 1
# What a run writes into its output directory besides PARTIAL_DIR: the report, model-level I-OBS's round log
# (compress.iobs_model.ROUNDS_FILE) and what dsf_runtime.checkpoint.save_compressed writes: the manifest, the tensors
# (one file, or shards and their index), config.json and the files it copies from the base model's directory.
_WRITTEN = re.compile("|".join([
    *(re.escape(name) for name in (MANIFEST_NAME, REPORT_FILE, "iobs_rounds.json", SINGLE_FILE, INDEX_NAME)),
    r"model-\d{5}-of-\d{5}\.safetensors", r"config\.json", r"generation_config\.json", r"tokenizer.*",
    r"special_tokens_map\.json", r"added_tokens\.json", r"vocab\..*", r"merges\.txt", r"chat_template\..*",
    r"spiece\.model",
]))
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")  # a writer's temporary file, named by its process id
_RESTART = "pass --overwrite instead of --resume to start over"


def _temp_path(path: Path) -> Path:
    """The temporary name ``.<name>.tmp-<pid>`` that this process writes ``path`` under before renaming it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_error(path: Path, exc: BaseException) -> OSError:
    """An ``OSError`` naming ``path`` and the fix for a failed write (``exc``: the OSError or SafetensorError)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    code = exc.errno if isinstance(exc, OSError) else errno.EIO
    return OSError(code, f"{reason}; free disk space (or fix the permissions), then re-run with --resume", str(path))


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on ``_temp_path(path)`` and rename it to ``path``; the temporary file never stays behind.

    Raises:
        OSError: naming ``path`` when the write fails (e.g. ``errno.ENOSPC``, a full disk); ``path`` is untouched.
    """
    tmp = _temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise _write_error(path, exc) from exc
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file in the same directory.

    Raises:
        OSError: naming ``path`` when the write fails (e.g. a full disk).
    """
    text = json.dumps(data, indent=2) + "\n"
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


class PartialRun:
    """Finished blocks of an unfinished run, stored under ``<out_dir>/.dsf-partial/``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / PARTIAL_DIR

    def _block_path(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.safetensors"

    def damaged(self, path: Path, problem: str) -> ValueError:
        """The error for a damaged file ``path`` of the partial state: names it, the problem and the fix."""
        return ValueError(
            f"{path}: {problem}; the saved state of the unfinished run is damaged: {_RESTART} "
            f"(or delete {self.path})"
        )

    def finished_blocks(self) -> list[int]:
        """Indices of the blocks whose file is complete, ascending."""
        return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("block-*.safetensors"))

    def write_state(self, fingerprint: Mapping[str, Any]) -> None:
        """Start the partial state: ``state.json`` with the run's ``fingerprint``."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / _STATE_FILE, {"format": _STATE_FORMAT, "version": _STATE_VERSION,
                                                    "config": fingerprint})

    def stored_fingerprint(self) -> dict[str, Any]:
        """The fingerprint recorded in ``state.json``.

        Raises:
            ValueError: naming ``state.json`` when it is missing, not JSON or not a state of this version.
        """
        path = self.path / _STATE_FILE
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise self.damaged(path, "missing") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise self.damaged(path, f"not valid JSON ({exc})") from exc
        if not (isinstance(stored, dict) and stored.get("format") == _STATE_FORMAT
                and stored.get("version") == _STATE_VERSION and isinstance(stored.get("config"), dict)):
            raise self.damaged(path, f"not a {_STATE_FORMAT} state of version {_STATE_VERSION} with a 'config'")
        return stored["config"]

    def save_block(self, index: int, results: Mapping[str, SolveResult]) -> None:
        """Store block ``index``'s factors (fp32, CPU) and errors atomically."""
        self.save_results(self._block_path(index).stem, results)

    def load_block(self, index: int, linears: Mapping[str, nn.Linear] | None = None) -> dict[str, SolveResult] | None:
        """Block ``index``'s results as stored by ``save_block``, or None when it is not finished.

        Args:
            index: the block.
            linears: the block's linears by name; when given, the stored layers must be exactly these, with
                factors of their shapes (a block file copied from another block or model is refused).

        Raises:
            ValueError: naming the block file when it is damaged or does not fit ``linears``.
        """
        results = self.load_results(self._block_path(index).stem)
        if results is not None and linears is not None:
            problem = _mismatch(results, linears)
            if problem:
                raise self.damaged(self._block_path(index), f"does not fit block {index}: {problem}")
        return results

    def save_results(self, name: str, results: Mapping[str, SolveResult]) -> None:
        """Store layers' factors (fp32, CPU), the scales of quantized values, and errors atomically as
        ``<name>.safetensors`` (masks are dropped)."""
        tensors, layers = {}, {}
        for layer, result in results.items():
            for factor, matrix in result.factors.items():
                tensors[f"{layer}.{factor}"] = matrix.detach().to("cpu", torch.float32).contiguous().clone()
            for factor, scales in (result.scales or {}).items():
                tensors[f"{layer}.{factor}.scales"] = scales.detach().to("cpu").contiguous().clone()
            layers[layer] = {
                "kind": result.kind,
                "nnz": result.nnz,
                "error": result.error,
                "relative_error": result.relative_error,
                "seconds": result.seconds,
                "values": result.values,
                "group_size": result.group_size,
            }
        self.save_tensors(name, tensors, {"layers": json.dumps(layers)})

    def load_results(self, name: str) -> dict[str, SolveResult] | None:
        """The results stored by ``save_results(name, ...)``, or None when there is no such file.

        Raises:
            ValueError: naming the file when it is not one that ``save_results`` wrote (truncated, not safetensors,
                e.g. a pickle, or without the layers' metadata and factors).
        """
        path = self.path / f"{name}.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                layers = json.loads((f.metadata() or {})["layers"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            return _results(layers, tensors)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
            problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise self.damaged(path, f"not a results file written by dsf ({type(exc).__name__}: {problem})") from exc

    def save_tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        """Write ``<name>.safetensors`` atomically (temp + rename).

        Raises:
            OSError: naming the file when the write fails (e.g. a full disk); the state stays as it was.
        """
        _write_atomic(self.path / f"{name}.safetensors",
                      lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_FACTORS = {"dsf": ("A", "B"), "single": ("W",)}


def _results(layers: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, SolveResult]:
    """``SolveResult`` per layer from a results file's ``layers`` metadata and its tensors.

    Raises:
        ValueError: the metadata is not ``{layer: {kind, nnz, error, relative_error, seconds}}`` or a layer's
            factors are missing; KeyError: a metadata field is missing.
    """
    if not isinstance(layers, dict):
        raise ValueError(f"metadata 'layers' is a {type(layers).__name__}, expected an object")
    results = {}
    for layer, info in layers.items():
        if not isinstance(info, dict) or info.get("kind") not in _FACTORS:
            raise ValueError(f"layer '{layer}' has no kind of {sorted(_FACTORS)}")
        values = info.get("values")
        if isinstance(values, str):  # written before each factor had its own format
            values = dict.fromkeys(_FACTORS[info["kind"]], values)
        if values is not None and (not isinstance(values, dict) or set(values) != set(_FACTORS[info["kind"]])
                                   or not set(values.values()) <= set(QUANTIZED_FORMATS)):
            raise ValueError(f"layer '{layer}' has value formats {values!r}, expected one of "
                             f"{list(QUANTIZED_FORMATS)} per factor")
        if values is not None and ("int4" in values.values()) != (info.get("group_size") is not None):
            raise ValueError(f"layer '{layer}' has group_size {info.get('group_size')!r} with value formats "
                             f"{values!r}: int4 factors need one, others none")
        needed = [f"{layer}.{k}{suffix}" for k in _FACTORS[info["kind"]] for suffix in ("", ".scales")
                  if suffix == "" or values is not None]
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise ValueError(f"tensor '{missing[0]}' is missing")
        results[layer] = SolveResult(
            kind=info["kind"],
            factors={k: tensors[f"{layer}.{k}"] for k in _FACTORS[info["kind"]]},
            nnz=info["nnz"],
            error=info["error"],
            relative_error=info["relative_error"],
            seconds=info["seconds"],
            values=values,
            scales=None if values is None else {k: tensors[f"{layer}.{k}.scales"] for k in _FACTORS[info["kind"]]},
            group_size=info.get("group_size"),
        )
    return results


def _mismatch(results: Mapping[str, SolveResult], linears: Mapping[str, nn.Linear]) -> str | None:
    """Why stored ``results`` do not fit ``linears`` (other layers, or factors of other shapes), or None."""
    if set(results) != set(linears):
        missing, extra = sorted(set(linears) - set(results)), sorted(set(results) - set(linears))
        return f"it lacks layer(s) {missing}" if missing else f"it holds other layer(s) {extra}"
    for name, result in results.items():
        out_features, in_features = linears[name].weight.shape
        shapes = {k: tuple(v.shape) for k, v in result.factors.items()}
        if result.kind == "dsf":
            fits = (len(shapes["A"]) == len(shapes["B"]) == 2 and shapes["A"][0] == out_features
                    and shapes["B"][1] == in_features and shapes["A"][1] == shapes["B"][0])
        else:
            fits = shapes["W"] == (out_features, in_features)
        if not fits:
            return f"the factors of '{name}' have shapes {shapes}, the layer is {out_features}×{in_features}"
    return None


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]


def prepare_output(out_dir: Path, fingerprint: Mapping[str, Any], *, resume: bool, overwrite: bool) -> PartialRun:
    """Make ``out_dir`` ready for a run and return its partial state.

    Temporary files that dead writers left in a previous dsf output are removed first.

    Args:
        out_dir: the output directory (created when missing).
        fingerprint: JSON-serializable settings that determine the factors.
        resume: continue an unfinished run found in ``out_dir`` (its fingerprint must equal ``fingerprint``).
        overwrite: delete a previous output or unfinished run in ``out_dir`` (only the files a run writes) and
            start over.

    Raises:
        FileExistsError: ``out_dir`` holds a finished output or an unfinished run and neither ``overwrite`` nor
            (for an unfinished run) ``resume`` was given, or it holds files that are not a dsf output (with
            ``overwrite``: any file a run does not write), or it is a file.
        ValueError: ``resume`` with an unfinished run whose settings differ (lists every difference) or whose
            ``state.json`` is damaged.
    """
    out_dir = Path(out_dir)
    fingerprint = json.loads(json.dumps(fingerprint))  # the form it takes after a round trip through the file
    partial = PartialRun(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} is a file, not a directory; choose another --output")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not ((out_dir / MANIFEST_NAME).exists() or partial.path.exists()):
            raise FileExistsError(
                f"output directory {out_dir} is not empty and holds no dsf output; choose another --output"
            )
        remove_stale_temp_files(out_dir)
        if overwrite:
            _remove_output(out_dir)
        elif (out_dir / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"output directory {out_dir} already holds a compressed model ({MANIFEST_NAME}); "
                "pass --overwrite to replace it or choose another --output"
            )
        elif not resume:
            raise FileExistsError(
                f"output directory {out_dir} holds an unfinished run ({PARTIAL_DIR}/, blocks "
                f"{partial.finished_blocks()} finished); pass --resume to continue it or --overwrite to start over"
            )
        else:
            diff = _differences(partial.stored_fingerprint(), fingerprint)
            if diff:
                raise ValueError(
                    f"cannot resume the unfinished run in {out_dir}: it was started with different settings "
                    f"({'; '.join(diff)}); rerun with the original settings, or pass --overwrite to start over"
                )
            logger.info("resuming the run in %s: blocks %s already finished", out_dir, partial.finished_blocks())
            return partial
    partial.write_state(fingerprint)
    return partial


def _written_by_dsf(entry: Path) -> bool:
    """Whether ``entry`` of an output directory is something a run writes (``.dsf-partial/`` or a file it names)."""
    if entry.name == PARTIAL_DIR:
        return entry.is_dir() and not entry.is_symlink()
    return (entry.is_file() or entry.is_symlink()) and _WRITTEN.fullmatch(entry.name) is not None


def _remove_output(out_dir: Path) -> None:
    """``--overwrite``: delete what a run wrote in ``out_dir``, after checking that it holds nothing else.

    Raises:
        FileExistsError: naming ``out_dir`` and the entries a run does not write (nothing is deleted then).
    """
    foreign = sorted(entry.name for entry in out_dir.iterdir() if not _written_by_dsf(entry))
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(
            f"output directory {out_dir} holds files that dsf did not write ({shown}); --overwrite only replaces "
            "a dsf output: move those files away or choose another --output"
        )
    logger.info("--overwrite: removing the previous dsf output in %s", out_dir)
    for entry in out_dir.iterdir():
        if entry.name == PARTIAL_DIR:
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    if not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Delete the temporary files (``.<name>.tmp-<pid>``) that writers which died left behind: in ``out_dir``
    those of the files a run writes, in its ``.dsf-partial/`` all of them. Those of live processes stay.

    Returns:
        The removed paths.
    """
    out_dir = Path(out_dir)
    removed = []
    for folder, names in ((out_dir, _WRITTEN), (out_dir / PARTIAL_DIR, re.compile(".+"))):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = _TEMP.fullmatch(entry.name)
            if (match and names.fullmatch(match["name"]) and entry.is_file()
                    and not _pid_alive(int(match["pid"]))):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    if removed:
        logger.info("removed temporary files of dead writers: %s", ", ".join(str(p) for p in removed))
    return removed


def check_complete(directory: Path) -> None:
    """Refuse, with the loader's error, a directory that holds compressed-model files (``.dsf-partial/`` or a
    safetensors file with dsf metadata) but no manifest: an interrupted write. Other directories pass.

    Raises:
        CheckpointError: from ``dsf_runtime.checkpoint.open_compressed``: the manifest is missing.
    """
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        return
    if (directory / PARTIAL_DIR).exists() or any(map(_has_dsf_metadata, directory.glob("*.safetensors"))):
        open_compressed(directory)  # raises the loader's "missing; the directory is incomplete ..." error


def _has_dsf_metadata(path: Path) -> bool:
    """Whether safetensors file ``path`` was written by dsf (its ``__metadata__`` names a dsf format)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return "dsf_format" in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def write_output(
    out_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    partial: PartialRun,
    info: Mapping[str, Any],
    config_source: Path | None,
) -> dict[str, Any]:
    """Assemble the finished run into a compressed model directory, then drop the partial state.

    Writes ``compression_report.json`` first and the model through ``save_compressed`` (manifest last), so the
    directory only looks complete once everything is in place.

    Raises:
        OSError: naming the file (or ``out_dir``) when a write fails, e.g. a full disk; ``partial`` is kept, so the
            run resumes (bit-identically) once there is space.

    Args:
        out_dir: the output directory (holding ``partial``).
        model: the model whose compressed linears' factors are all stored in ``partial``; its other tensors
            (embeddings, norms, biases) are written as they are.
        tokenizer: saved when there is no ``config_source`` to copy it from.
        spec: the model's architecture spec.
        partial: the finished blocks.
        info: the settings that produced the factors (recorded in the manifest's ``compression``); its ``layout``
            and ``save_dtype`` (resolved, e.g. ``"bfloat16"``) say how the factors and other floating tensors are
            written, its ``embedding`` (``int8``, the default, or ``keep``) how the input embedding is.
        config_source: the base model's directory (``config.json``, tokenizer files are copied), or None to write
            ``model.config`` and save ``tokenizer``.

    Returns:
        The content of ``compression_report.json``: ``{"base_model", "architecture", "compression",
        "layer_errors": compress.evaluate.layer_error_report(...)}``.
    """
    layers, rows = {}, {}
    dtype = getattr(torch, info["save_dtype"])  # a name of compress.api.DTYPES
    for index in range(len(decoder_blocks(model, spec))):
        results = partial.load_block(index)
        assert results is not None, f"block {index} was never stored"
        for name, result in results.items():
            linear = model.get_submodule(name)
            bias = None if linear.bias is None else linear.bias.detach()
            if result.values is None:
                layers[name] = CompressedLayer.from_dense(
                    result.kind, result.factors, method=info["method"], bias=bias, error=result.error,
                    relative_error=result.relative_error, layout=info["layout"], dtype=dtype,
                )
            else:  # the codes with their scales (in the save dtype)
                codes = {k: codes_of(f, result.scales[k], result.values[k],
                                     result.group_size if result.values[k] == "int4" else None)
                         for k, f in result.factors.items()}
                scales = {k: s.to(dtype) for k, s in result.scales.items()}
                layers[name] = CompressedLayer.from_dense(
                    result.kind, codes, scales=scales, group_size=result.group_size, method=info["method"], bias=bias,
                    error=result.error,
                    relative_error=result.relative_error, layout=info["layout"],
                )
            out_features, in_features = linear.weight.shape
            rows[name] = {
                "method": info["method"],
                "shape": [out_features, in_features],
                "nnz": result.nnz,
                "density": result.nnz / (out_features * in_features),
                "error": result.error,
                "relative_error": result.relative_error,
                "seconds": result.seconds,
            }
    tensors = cast_floating({k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in layers}, dtype)
    if info.get("embedding", "int8") == "int8":
        tensors = quantize_embedding(tensors, input_embedding_name(model))
    report = {
        "base_model": info["model"],
        "architecture": type(model).__name__,
        "compression": dict(info),
        "layer_errors": layer_error_report(rows),
    }
    write_json_atomic(out_dir / REPORT_FILE, report)
    if config_source is None:
        tokenizer.save_pretrained(out_dir)
        source: Path | dict[str, Any] = json.loads(model.config.to_json_string(use_diff=False))
    else:
        source = config_source
    try:
        save_compressed(
            out_dir, tensors=tensors, layers=layers, config_source=source,
            info={"base_model": info["model"], "architecture": type(model).__name__, "compression": dict(info)},
        )
    except (OSError, SafetensorError) as exc:  # the partial state is kept: --resume writes the model again
        raise _write_error(out_dir, exc) from exc
    partial.remove()
    return report


def cast_floating(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``tensors`` with the floating ones cast to ``dtype``; tensors that share storage (tied weights) stay shared,
    so ``save_compressed`` still stores them once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in tensors.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in cast:
            cast[key] = t.to(dtype)
        out[name] = cast[key]
    return out


def read_layer_errors(directory: Path) -> dict[str, Any] | None:
    """The layer-error report of a compressed directory: from ``compression_report.json`` (with solve times) when
    present, else from the manifest's layers; None for a directory that is not compressed."""
    directory = Path(directory)
    if (directory / REPORT_FILE).exists():
        return json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))["layer_errors"]
    if (directory / MANIFEST_NAME).exists():
        return layer_error_report(json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))["layers"])
    return None
