"""``dsf export``: convert a compressed directory to another layout, a dense Hugging Face fallback, or ONNX."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

import typer

from dsf_cli.common import DType, fail
from dsf_runtime.formats import AUTO, LAYOUTS

__all__ = ["register"]


# auto, then one choice per layout of dsf_runtime.formats: the stored ones and the GPU kernels' (nibble, delta, tile).
Layout = Enum("Layout", {name: name for name in (AUTO, *LAYOUTS)}, type=str)
_ONNX_AUTO = "bitmask"  # the ONNX export needs one layout for every factor: the smallest there on DSF factors


class BlockSize(str, Enum):
    b16 = "16"
    b32 = "32"
    b64 = "64"


class Lowering(str, Enum):
    custom = "custom"
    standard = "standard"


class Embedding(str, Enum):
    int8 = "int8"
    keep = "keep"


def export(
    src: Path = typer.Argument(..., help="A compressed model directory (from `dsf compress` or `dsf export`)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output directory: a compressed directory in --layout, or with --dense-fallback "
        "an ordinary Hugging Face checkpoint."
    ),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="Write an ONNX model (input_ids -> logits) to this .onnx file plus its .onnx.data."
    ),
    layout: Layout = typer.Option(
        Layout.auto, "--layout", help="Layout of the factors: auto = each factor in the smallest of bitmask, csr and "
        "dense; or one layout for every factor: csr, bitmask, bsr, dense, or the GPU kernels' nibble (balanced "
        "factors) / delta (any mask), loaded on CUDA as stored. ONNX: csr, bitmask or bsr (auto = bitmask)."
    ),
    dtype: DType | None = typer.Option(
        None, "--dtype", help="Cast factor values and floating tensors (ONNX: float16 or float32); default: keep."
    ),
    block_size: BlockSize = typer.Option(BlockSize.b32, "--block-size", help="bsr block size b (b × b blocks)."),
    max_shard_size: str = typer.Option(
        "2GiB", "--max-shard-size", help="safetensors shard limit, e.g. 2GiB, 500MB or bytes (directories only)."
    ),
    dense_fallback: bool = typer.Option(
        False, "--dense-fallback", help="Multiply the factors out into a dense checkpoint that plain transformers "
        "loads (as large as the original model)."
    ),
    lowering: Lowering = typer.Option(
        Lowering.custom, "--lowering", help="ONNX: custom = ai.dsf nodes (needs exporters.onnx_ops to run); "
        "standard = standard operators only (any ONNX Runtime; densified when the session loads)."
    ),
    embedding: Embedding = typer.Option(
        Embedding.int8, "--embedding", help="Directories: int8 = the input embedding (and the output layer tied to "
        "it) as int8 with one scale per row, half the bytes of fp16 (its perplexity cost is in docs/benchmarks.md); "
        "keep = as stored."
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX default-domain opset (>= 18)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output or an existing --onnx file."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="ONNX: check the written model (onnx.checker, and one ONNX Runtime run "
        "on a few tokens against torch) before it is moved into place."
    ),
) -> None:
    """Export a compressed model: to another layout or dtype, to a dense fallback, or to ONNX.

    Every output is written under a temporary name and renamed into place, so it is complete or absent. A
    compressed directory's size is printed against the same model dense in fp16, with a warning when it is larger.

    Examples:

        dsf export runs/demo-smollm2-dsf50 -o smollm2-dsf50                 (auto layout, stored dtype, int8 embedding)

        dsf export runs/demo-smollm2-dsf50 -o smollm2-gpu --layout nibble --dtype float16

        dsf export runs/demo-smollm2-dsf50 --onnx smollm2-dsf50.onnx
    """
    if (output is None) == (onnx is None):
        raise fail("pass exactly one of --output DIR and --onnx FILE")
    if dense_fallback and output is None:
        raise fail("--dense-fallback writes a directory: pass --output DIR")
    for name in ("onnx_ir", "onnxscript"):  # the ONNX exporter's passes log every constant they touch at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    from dsf_runtime.checkpoint import CheckpointError
    from exporters.config import ExportConfig

    try:
        chosen = _ONNX_AUTO if onnx is not None and layout.value == AUTO else layout.value
        config = ExportConfig(layout=chosen, dtype=dtype and dtype.value, block_size=int(block_size.value),
                              max_shard_size=max_shard_size, embedding=embedding.value)
        if onnx is not None:
            from exporters.onnx_export import export_onnx

            written = export_onnx(src, onnx, config, lowering=lowering.value, opset=opset, overwrite=overwrite,
                                  verify=verify)
        elif dense_fallback:
            from exporters.dense_fallback import export_dense_fallback

            written = export_dense_fallback(src, output, dtype=config.torch_dtype, max_shard_size=max_shard_size,
                                            overwrite=overwrite)
        else:
            from exporters.layouts import convert_layout

            written = convert_layout(src, output, config, overwrite=overwrite)
    except (CheckpointError, FileExistsError, ValueError, ImportError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"wrote {written}")
    if output is not None and not dense_fallback:
        report_size(written)


def report_size(directory: Path) -> None:
    """Print the directory's bytes against the dense fp16 model; warn (stderr) with the fix when it is larger."""
    from dsf_runtime.checkpoint import open_compressed

    with open_compressed(directory) as ckpt:
        size = ckpt.size_summary()
    typer.echo(f"{size['total_bytes'] / 2**20:.1f} MiB = {size['ratio']:.3f}x the dense fp16 model "
               f"(compressed linears {size['linear_ratio']:.3f}x)")
    if size["ratio"] > 1:
        typer.echo(f"warning: {directory} is larger than the same model dense in fp16; export it with `dsf export "
                   f"{directory} -o OUT --layout auto --dtype float16` (or bfloat16) for the smallest files", err=True)


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``dsf`` command."""
    app.command("export")(export)
