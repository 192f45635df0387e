"""The compression output directory and the resumable state of an unfinished run.

While a run is in progress, ``<out>/.dsf-partial/`` holds:

* ``state.json``: ``{"format": "dsf-partial", "version": 1, "config": {...}}``, the fingerprint of everything
  that determines the factors (model, text, method, density, solver options, samples, seqlen, seed, ...);
* ``block-00003.safetensors``: the factors of every linear of finished block 3 (``<fqn>.A``/``<fqn>.B`` or
  ``<fqn>.W``, fp32) with their errors in the file's metadata, written to a temporary name and renamed;
* model-level I-OBS (``compress.iobs_model``) adds its round checkpoints: ``iobs-state.json``, the weights after
  the last finished round and the best round's results.

When every block is finished, ``write_output`` writes ``compression_report.json`` and then the compressed model
through ``dsf_runtime.checkpoint.save_compressed`` (whose manifest comes last), and removes the partial state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.architectures import ArchitectureSpec, decoder_blocks
from compress.evaluate import layer_error_report
from compress.solvers.base import SolveResult
from dsf_runtime.checkpoint import MANIFEST_NAME, CompressedLayer, save_compressed

__all__ = [
    "PARTIAL_DIR",
    "REPORT_FILE",
    "PartialRun",
    "prepare_output",
    "read_layer_errors",
    "write_json_atomic",
    "write_output",
]

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".dsf-partial"
REPORT_FILE = "compression_report.json"
_STATE_FILE = "state.json"
_STATE_FORMAT = "dsf-partial"
_STATE_VERSION = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PartialRun:
    """Finished blocks of an unfinished run, stored under ``<out_dir>/.dsf-partial/``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / PARTIAL_DIR

    def _block_path(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.safetensors"

    def finished_blocks(self) -> list[int]:
        """Indices of the blocks whose file is complete, ascending."""
        return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("block-*.safetensors"))

    def save_block(self, index: int, results: Mapping[str, SolveResult]) -> None:
        """Store block ``index``'s factors (fp32, CPU) and errors atomically."""
        self.save_results(self._block_path(index).stem, results)

    def load_block(self, index: int) -> dict[str, SolveResult] | None:
        """Block ``index``'s results as stored by ``save_block``, or None when it is not finished."""
        return self.load_results(self._block_path(index).stem)

    def save_results(self, name: str, results: Mapping[str, SolveResult]) -> None:
        """Store layers' factors (fp32, CPU) and errors atomically as ``<name>.safetensors`` (masks are dropped)."""
        tensors, layers = {}, {}
        for layer, result in results.items():
            for factor, matrix in result.factors.items():
                tensors[f"{layer}.{factor}"] = matrix.detach().to("cpu", torch.float32).contiguous().clone()
            layers[layer] = {
                "kind": result.kind,
                "nnz": result.nnz,
                "error": result.error,
                "relative_error": result.relative_error,
                "seconds": result.seconds,
            }
        self.save_tensors(name, tensors, {"layers": json.dumps(layers)})

    def load_results(self, name: str) -> dict[str, SolveResult] | None:
        """The results stored by ``save_results(name, ...)``, or None when there is no such file."""
        path = self.path / f"{name}.safetensors"
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            layers = json.loads(f.metadata()["layers"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        results = {}
        for layer, info in layers.items():
            factors = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == layer}
            results[layer] = SolveResult(
                kind=info["kind"],
                factors=factors,
                nnz=info["nnz"],
                error=info["error"],
                relative_error=info["relative_error"],
                seconds=info["seconds"],
            )
        return results

    def save_tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        """Write ``<name>.safetensors`` atomically (temp + rename)."""
        target = self.path / f"{name}.safetensors"
        tmp = target.with_name(f".{target.name}.tmp")
        save_file(dict(tensors), str(tmp), metadata=metadata)
        os.replace(tmp, target)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]


def prepare_output(out_dir: Path, fingerprint: Mapping[str, Any], *, resume: bool, overwrite: bool) -> PartialRun:
    """Make ``out_dir`` ready for a run and return its partial state.

    Args:
        out_dir: the output directory (created when missing).
        fingerprint: JSON-serializable settings that determine the factors.
        resume: continue an unfinished run found in ``out_dir`` (its fingerprint must equal ``fingerprint``).
        overwrite: delete a previous output or unfinished run in ``out_dir`` and start over.

    Raises:
        FileExistsError: ``out_dir`` holds a finished output or an unfinished run and neither ``overwrite`` nor
            (for an unfinished run) ``resume`` was given, or it holds files that are not a dsf output.
        ValueError: ``resume`` with an unfinished run whose settings differ (lists every difference).
    """
    out_dir = Path(out_dir)
    fingerprint = json.loads(json.dumps(fingerprint))  # the form it takes after a round trip through the file
    partial = PartialRun(out_dir)
    state_path = partial.path / _STATE_FILE
    ours = (out_dir / MANIFEST_NAME).exists() or partial.path.exists()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not ours:
            raise FileExistsError(
                f"output directory {out_dir} is not empty and holds no dsf output; choose another --output"
            )
        if overwrite:
            logger.info("--overwrite: removing the previous contents of %s", out_dir)
            shutil.rmtree(out_dir)
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
            stored = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
            if stored.get("format") != _STATE_FORMAT or stored.get("version") != _STATE_VERSION:
                raise ValueError(
                    f"{state_path}: not a dsf-partial state of version {_STATE_VERSION}; "
                    "pass --overwrite to start over"
                )
            diff = _differences(stored["config"], fingerprint)
            if diff:
                raise ValueError(
                    f"cannot resume the unfinished run in {out_dir}: it was started with different settings "
                    f"({'; '.join(diff)}); rerun with the original settings, or pass --overwrite to start over"
                )
            logger.info("resuming the run in %s: blocks %s already finished", out_dir, partial.finished_blocks())
            return partial
    partial.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path, {"format": _STATE_FORMAT, "version": _STATE_VERSION, "config": fingerprint})
    return partial


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

    Args:
        out_dir: the output directory (holding ``partial``).
        model: the model whose compressed linears' factors are all stored in ``partial``; its other tensors
            (embeddings, norms, biases) are written as they are.
        tokenizer: saved when there is no ``config_source`` to copy it from.
        spec: the model's architecture spec.
        partial: the finished blocks.
        info: the settings that produced the factors (recorded in the manifest's ``compression``).
        config_source: the base model's directory (``config.json``, tokenizer files are copied), or None to write
            ``model.config`` and save ``tokenizer``.

    Returns:
        The content of ``compression_report.json``: ``{"base_model", "architecture", "compression",
        "layer_errors": compress.evaluate.layer_error_report(...)}``.
    """
    layers, rows = {}, {}
    for index in range(len(decoder_blocks(model, spec))):
        results = partial.load_block(index)
        assert results is not None, f"block {index} was never stored"
        for name, result in results.items():
            linear = model.get_submodule(name)
            bias = None if linear.bias is None else linear.bias.detach()
            layers[name] = CompressedLayer.from_dense(
                result.kind, result.factors, method=info["method"], bias=bias,
                error=result.error, relative_error=result.relative_error,
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
    tensors = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in layers}
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
    save_compressed(
        out_dir, tensors=tensors, layers=layers, config_source=source,
        info={"base_model": info["model"], "architecture": type(model).__name__, "compression": dict(info)},
    )
    partial.remove()
    return report


def read_layer_errors(directory: Path) -> dict[str, Any] | None:
    """The layer-error report of a compressed directory: from ``compression_report.json`` (with solve times) when
    present, else from the manifest's layers; None for a directory that is not compressed."""
    directory = Path(directory)
    if (directory / REPORT_FILE).exists():
        return json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))["layer_errors"]
    if (directory / MANIFEST_NAME).exists():
        return layer_error_report(json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))["layers"])
    return None
