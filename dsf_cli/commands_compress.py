"""``dsf compress``, ``dsf eval`` and ``dsf demo``: a thin mapping from flags to ``compress.api`` (compression),
``compress.evaluate`` (perplexity, layer errors) and ``dsf_runtime.from_pretrained`` (loading compressed models)."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from dsf_cli.common import DType, check_device, fail, load_tokenizer, user_errors

__all__ = ["register"]

logger = logging.getLogger(__name__)

_PACKAGED_MODEL = "smollm2-135m"  # compress.assets.PACKAGED_MODEL, repeated to keep `dsf --help` free of torch
_TEXTS = "emma, mansfield-park, northanger-abbey, persuasion, pride-and-prejudice, sense-and-sensibility"
# Flag of each CompressConfig field, to name the flag in errors.
_FLAGS = {
    "density": "--density/--sparsity",
    "method": "--method",
    "solver_options": "method options",
    "samples": "--samples",
    "seqlen": "--seqlen",
    "batch_size": "--batch-size",
    "dtype": "--dtype",
    "device": "--device",
    "offload": "--offload",
    "pipeline": "--pipeline",
    "rounds": "--iobs-rounds",
    "step": "--iobs-step",
    "heldout": "--heldout",
    "value_group_size": "--value-group-size",
    "rounding": "--rounding",
    "small_factor_values": "--small-factor-values",
    "layout": "--layout",
    "save_dtype": "--save-dtype",
    "embedding": "--embedding",
    "values": "--values",
    "nproc": "--nproc",
}
_DEMO_OUTPUT = Path("runs/demo-smollm2-dsf50")


class Method(str, Enum):  # compress.solvers.METHODS (a test keeps them equal)
    dsf = "dsf"
    sparsegpt = "sparsegpt"
    wanda = "wanda"
    magnitude = "magnitude"
    iobs = "iobs"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Offload(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class Matmul(str, Enum):  # compress.solvers.products.MATMUL_PRECISIONS
    fp32 = "fp32"
    three_tf32 = "3xtf32"


class Pipeline(str, Enum):  # compress.api.PIPELINES
    sequential = "sequential"
    dense_inputs = "dense-inputs"


def _density(density: float | None, sparsity: float | None) -> float:
    if density is not None and sparsity is not None:
        raise fail("pass either --density or --sparsity, not both (density = 1 - sparsity)")
    if sparsity is not None:
        return 1.0 - sparsity
    return 0.5 if density is None else density


def _solver_options(**options: Any) -> dict[str, Any]:
    """The method options the user set (None = not given, so a method never sees options it lacks)."""
    return {k: v for k, v in options.items() if v is not None}


def _config(**fields: Any):
    from compress.api import CompressConfig, ConfigError

    try:
        return CompressConfig(**fields)
    except ConfigError as exc:
        raise fail(f"{_FLAGS.get(exc.field, exc.field)}: {exc.message}") from exc


def compress(
    model: str = typer.Option(
        _PACKAGED_MODEL, "--model", help=f"Hugging Face model directory, or {_PACKAGED_MODEL} (the packaged SmolLM2)."
    ),
    method: Method = typer.Option(Method.dsf, "--method", help="Compression method."),
    density: float | None = typer.Option(
        None, "--density", help="Fraction of each layer's weights kept, in (0, 1] (DSF: both factors). Default 0.5."
    ),
    sparsity: float | None = typer.Option(
        None, "--sparsity", help="Fraction pruned (= 1 - density); instead of --density."
    ),
    calibration: str = typer.Option("emma", "--calibration", help=f"Calibration text: {_TEXTS}, or a UTF-8 file."),
    samples: int = typer.Option(64, "--samples", help="Calibration windows (random offsets)."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration window offsets."),
    device: Device = typer.Option(Device.auto, "--device", help="Compute device; auto = cuda when available."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Model dtype while compressing (factors stay fp32)."),
    layout: str = typer.Option(
        "auto", "--layout", metavar="<auto|bitmask|csr|dense|bsr|nibble|delta|tile>",
        help="Layout of the written factors: auto = each factor in the smallest of bitmask, csr and dense.",
    ),
    save_dtype: str = typer.Option(
        "auto", "--save-dtype", metavar="<auto|float16|bfloat16|float32>",
        help="dtype of the written factor values and other floating tensors: auto = the model's own dtype if it "
        "is float16/bfloat16, else float16.",
    ),
    values: str = typer.Option(
        "float", "--values", metavar="<float|int8|fp8|int4>",
        help="Factor values: float = in --save-dtype; int8 / fp8 = codes with one scale per row; int4 = codes with "
        "one scale per --value-group-size columns (docs/quantized-values.md).",
    ),
    value_group_size: int | None = typer.Option(
        None, "--value-group-size", metavar="<64|128|256>", help="int4 values: columns per scale (default 128).",
    ),
    small_factor_values: str | None = typer.Option(
        None, "--small-factor-values", metavar="<int8|fp8|int4>",
        help="DSF: the value format of each layer's factor with fewer non-zeros (default: --values). "
        "--values int4 --small-factor-values int8 keeps DSF's near-identity square factor in int8 for a few "
        "percent more bytes (docs/quantized-values.md).",
    ),
    rounding: str = typer.Option(
        "gptq", "--rounding", metavar="<gptq|rtn>",
        help="How values are quantized: gptq = error feedback under each layer's H (restricted to the mask); "
        "rtn = round to nearest, for comparison.",
    ),
    embedding: str = typer.Option(
        "int8", "--embedding", metavar="<int8|keep>",
        help="int8 = the input embedding (and the output layer tied to it) as int8 with one scale per row, half "
        "the bytes of fp16; keep = in --save-dtype.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward chunk."),
    offload: Offload = typer.Option(
        Offload.auto, "--offload",
        help="Calibration activations: auto = on the device if they fit, else CPU; always = CPU; never = device.",
    ),
    true_sequential: bool = typer.Option(
        False, "--true-sequential", help="Compress a block's groups one after another (more passes)."
    ),
    pipeline: Pipeline = typer.Option(
        Pipeline.sequential, "--pipeline",
        help="What each block is calibrated on: sequential = the outputs of the already compressed blocks (the "
        "reference); dense-inputs = the dense model's activations (docs/scale-out.md: its perplexity cost).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory (a compressed model directory)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --output (same settings)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the dsf output or unfinished run in --output."),
    iters: int | None = typer.Option(
        None, "--iters", help="DSF: outer alternating iterations (default 40); I-OBS: iterations (default 5)."
    ),
    finalize: bool | None = typer.Option(
        None, "--finalize/--no-finalize", help="DSF: refit the left factor under the full H (default: on)."
    ),
    finalize_iters: int | None = typer.Option(
        None, "--finalize-iters", help="DSF: ADMM steps of the refit (default 20)."
    ),
    square_density: float | None = typer.Option(
        None, "--square-density", help="DSF: density of the square factor (default 0.16 square W, 0.25 otherwise)."
    ),
    group_size: int | None = typer.Option(
        None, "--group-size", min=2, max=16,
        help="DSF: balanced factors, N non-zeros in every group of this many columns (16: the GPU nibble kernels).",
    ),
    matmul: Matmul | None = typer.Option(
        None, "--matmul",
        help="DSF: precision of the solver's large products: fp32 (default, the reference) or 3xtf32 "
        "(error-compensated TF32 on tensor cores; on a CPU it only runs slower).",
    ),
    prune_n: int | None = typer.Option(None, "--prune-n", help="SparseGPT/Wanda/magnitude/I-OBS: N of N:M sparsity."),
    prune_m: int | None = typer.Option(None, "--prune-m", help="SparseGPT/Wanda/magnitude/I-OBS: M of N:M sparsity."),
    blocksize: int | None = typer.Option(None, "--blocksize", help="SparseGPT: columns per block (default 128)."),
    percdamp: float | None = typer.Option(
        None, "--percdamp", help="SparseGPT/I-OBS: dampening, fraction of mean diag H (0.01)."
    ),
    iobs_rounds: int = typer.Option(
        0, "--iobs-rounds", help="Model-level I-OBS with --method sparsegpt or iobs: rounds of calibration-gradient "
        "steps, each re-projected, the best kept by held-out perplexity (0 = one-shot; resumes by round)."
    ),
    iobs_step: float = typer.Option(0.05, "--iobs-step", help="Model-level I-OBS: step size of W - step*grad*H^-1."),
    heldout: str = typer.Option(
        "northanger-abbey", "--heldout", help="Model-level I-OBS: text that chooses the best round."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Ranks to compress with: relaunches this command under torchrun (gloo on CPU, NCCL "
        "on GPUs; DSF_DIST_TIMEOUT seconds per collective, default 600); the same factors as one process. Under an "
        "existing torchrun, leave it out.",
    ),
) -> None:
    """Compress every linear layer of a decoder (block by block, with calibration data) into --output.

    The output is a reloadable compressed model directory (docs/format.md), packed (--layout auto, values in the
    model's own 16-bit dtype), plus compression_report.json with each layer's nnz, error and relative error. An
    interrupted run continues with --resume.

    Example:

        dsf compress --model smollm2-135m --method dsf --density 0.5 --output runs/smollm2-dsf50

        dsf compress --nproc 2 --output runs/smollm2-dsf50          (2 ranks, same factors)

        dsf compress --values int8 --output runs/smollm2-dsf50-int8   (int8 factor values, row scales)

        dsf compress --values int4 --value-group-size 128 --output runs/smollm2-dsf50-int4

        dsf compress --values int4 --small-factor-values int8 --output runs/smollm2-dsf50-int4-int8
    """
    import sys

    from compress.api import ConfigError, compress_model
    from compress.distributed import launched_world, maybe_relaunch

    if iobs_rounds and (nproc > 1 or launched_world()):
        raise fail("--iobs-rounds runs in one process; drop --nproc (model-level I-OBS is not distributed)")
    try:
        code = maybe_relaunch(nproc, sys.argv[1:])
    except ConfigError as exc:
        raise fail(f"{_FLAGS.get(exc.field, exc.field)}: {exc.message}") from exc
    if code is not None:
        raise typer.Exit(code)
    options = _solver_options(
        iters=iters, finalize=finalize, finalize_iters=finalize_iters, square_density=square_density,
        group_size=group_size, matmul=matmul and matmul.value, prune_n=prune_n, prune_m=prune_m, blocksize=blocksize,
        percdamp=percdamp,
    )
    config = _config(
        model=model, method=method.value, density=_density(density, sparsity), solver_options=options,
        calibration=calibration, samples=samples, seqlen=seqlen, seed=seed, device=device.value,
        dtype=dtype.value, batch_size=batch_size, offload=offload.value, true_sequential=true_sequential,
        pipeline=pipeline.value,
        layout=layout, save_dtype=save_dtype, embedding=embedding, values=values,
        value_group_size=value_group_size, rounding=rounding, small_factor_values=small_factor_values,
    )
    try:
        if iobs_rounds:
            from compress.iobs_model import IOBSModelConfig, compress_iobs_model

            rounds = IOBSModelConfig(rounds=iobs_rounds, step=iobs_step, heldout=heldout)
            report = compress_iobs_model(config, output, rounds, resume=resume, overwrite=overwrite, progress=progress)
            typer.echo(f"model-level I-OBS: kept round {report['iobs_rounds']['best_round']} of {iobs_rounds}")
        else:
            report = compress_model(config, output, resume=resume, overwrite=overwrite, progress=progress)
            if report is None:  # a rank other than 0 of a distributed run; rank 0 prints the summary
                return
    except ConfigError as exc:
        raise fail(f"{_FLAGS.get(exc.field, exc.field)}: {exc.message}") from exc
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise fail(str(exc)) from exc
    summary = report["layer_errors"]["summary"]
    typer.echo(
        f"wrote {output}: {summary['layers']} layers, {summary['total_nnz']:,} of {summary['total_params']:,} "
        f"weights kept (density {summary['density']:.4f}), mean relative error {summary['mean_relative_error']:.4g}"
    )
    from dsf_cli.commands_export import report_size

    report_size(output)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _load_model(model: str, device: str, dtype: str):
    """A dense model (directory or the packaged name) or a compressed one (via dsf_runtime.from_pretrained).

    Returns:
        ``(model in eval mode on the device, tokenizer, its directory)``.

    Raises:
        FileNotFoundError: no such model directory; ValueError: a directory with compressed-model files but no
            manifest (``CheckpointError``), CUDA without a CUDA device (``ConfigError``), tokenizer files that do
            not load.
    """
    from transformers import AutoModelForCausalLM

    import dsf_runtime
    from compress.api import DTYPES, resolve_device, resolve_model_dir
    from dsf_runtime.checkpoint import MANIFEST_NAME

    path = resolve_model_dir(model)
    target = resolve_device(device)
    tokenizer = load_tokenizer(path)
    if (path / MANIFEST_NAME).exists():
        loaded = dsf_runtime.from_pretrained(path, device=target, dtype=DTYPES[dtype])
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False).to(target)
    return loaded.eval(), tokenizer, path


def _check_context(model: str, seqlen: int) -> None:
    """Refuse ``seqlen`` beyond the context of ``model`` (read from its config.json, before the weights load)."""
    from transformers import AutoConfig

    from compress.api import check_seqlen, resolve_model_dir

    check_seqlen(seqlen, AutoConfig.from_pretrained(resolve_model_dir(model), trust_remote_code=False), model)


def evaluate(
    model: str = typer.Option(
        _PACKAGED_MODEL, "--model",
        help=f"Model directory (dense, or compressed with dsf_manifest.json), or {_PACKAGED_MODEL}.",
    ),
    text: str = typer.Option("persuasion", "--text", help=f"Evaluation text: {_TEXTS}, or a UTF-8 file."),
    seqlen: int = typer.Option(1024, "--seqlen", help="Tokens per non-overlapping window."),
    max_windows: int = typer.Option(
        32, "--max-windows", min=0, help="Evaluate the first N windows (32 = ~28% of Persuasion; 0 = all ~113)."
    ),
    device: Device = typer.Option(Device.auto, "--device", help="Device; auto = cuda when available."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Compute dtype."),
    report_json: Path | None = typer.Option(
        None, "--report-json", help="Write perplexity and layer errors as JSON here."
    ),
    report_md: Path | None = typer.Option(None, "--report-md", help="Write the layer-error table as markdown here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Perplexity of a dense or compressed model, and the layer-error table of a compressed one.

    Protocol: the raw line-wrapped text is tokenized once without BOS and cut into non-overlapping windows of
    --seqlen tokens; the first --max-windows windows are evaluated, one forward each; perplexity =
    exp(mean NLL over all predicted tokens, i.e. windows × (seqlen - 1)).
    """
    import time

    from compress.api import ConfigError
    from compress.data import load_evaluation
    from compress.evaluate import layer_error_markdown, perplexity
    from compress.output import read_layer_errors

    start = time.perf_counter()
    try:
        check_device(device.value)
        _check_context(model, seqlen)
        loaded, tokenizer, path = _load_model(model, device.value, dtype.value)
        windows = load_evaluation(tokenizer, text, seqlen, max_windows)
    except ConfigError as exc:
        raise fail(f"{_FLAGS.get(exc.field, exc.field)}: {exc.message}") from exc
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    result = {
        "model": model,
        "text": text,
        **perplexity(loaded, windows, progress=progress).to_dict(),
        "seconds": time.perf_counter() - start,
        "layer_errors": read_layer_errors(path),
    }
    typer.echo(
        f"perplexity {result['perplexity']:.4f} on {text} ({result['windows']} windows × {seqlen} tokens, "
        f"{result['tokens']:,} predicted tokens)"
    )
    table = None
    if result["layer_errors"] is not None:
        table = layer_error_markdown(result["layer_errors"])
        typer.echo(table)
    if report_json is not None:
        _write_text(report_json, json.dumps(result, indent=2) + "\n")
    if report_md is not None:
        header = f"# {model}\n\nPerplexity {result['perplexity']:.4f} on {text} ({result['windows']}×{seqlen}).\n\n"
        _write_text(report_md, header + (table or "Not a compressed model: no layer errors.\n"))


def demo(
    output: Path = typer.Option(_DEMO_OUTPUT, "--output", "-o", help="Where the compressed model goes (git-ignored)."),
    device: Device = typer.Option(Device.auto, "--device", help="Device; auto = cuda when available."),
    samples: int = typer.Option(16, "--samples", help="Calibration windows of 512 Emma tokens (full setting: 64)."),
    iters: int = typer.Option(20, "--iters", help="DSF outer iterations (full setting: 40)."),
    windows: int = typer.Option(8, "--windows", help="Persuasion windows of 1024 tokens for perplexity (of ~113)."),
    prompt: str = typer.Option("Once upon a time, there was a little girl who", "--prompt", help="Generation prompt."),
) -> None:
    """Compress the packaged SmolLM2-135M to density 0.5 with DSF, compare perplexity, and generate.

    A light setting so it finishes in about 7 minutes on a 2-core CPU: 16 Emma calibration windows of 512 tokens
    and 20 DSF outer iterations (the full setting, `dsf compress --method dsf`, is 64 windows and 40 iterations);
    perplexity on the first 8 Persuasion windows of 1024 tokens. The compressed model is reloaded from --output
    through dsf_runtime.from_pretrained.

    Measured on an idle 2-core CPU: 6 min 43 s; perplexity 32.87 dense -> 39.71 after (8 windows).
    """
    import torch

    from compress.api import compress_model
    from compress.data import load_evaluation
    from compress.evaluate import perplexity

    config = _config(
        model=_PACKAGED_MODEL, method="dsf", density=0.5, solver_options={"iters": iters}, samples=samples,
        seqlen=512, device=device.value,
    )
    done = (output / "dsf_manifest.json").exists()  # a previous demo: redo it; an interrupted one: resume it
    dense, tokenizer, _ = _load_model(_PACKAGED_MODEL, device.value, "float32")
    eval_windows = load_evaluation(tokenizer, "persuasion", 1024, windows)
    before = perplexity(dense, eval_windows)
    del dense
    typer.echo(f"dense perplexity (Persuasion, {len(eval_windows)}×1024 tokens): {before.perplexity:.3f}")
    try:
        report = compress_model(config, output, resume=not done, overwrite=done)
    except (FileExistsError, ValueError) as exc:
        raise fail(f"{exc} (or pass another --output)") from exc
    compressed, tokenizer, _ = _load_model(str(output), device.value, "float32")
    after = perplexity(compressed, eval_windows)
    summary = report["layer_errors"]["summary"]
    typer.echo(f"DSF 50% perplexity: {after.perplexity:.3f} (dense {before.perplexity:.3f})")
    typer.echo(
        f"compressed linears: {summary['total_params']:,} dense weights -> {summary['total_nnz']:,} non-zeros "
        f"in A and B (density {summary['density']:.3f}); mean relative layer error "
        f"{summary['mean_relative_error']:.4f}"
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(compressed.parameters()).device)
    with torch.inference_mode():
        generated = compressed.generate(ids, max_new_tokens=30, do_sample=False)
    typer.echo(f"generated: {prompt}{tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)}")


def register(app: typer.Typer) -> None:
    """Add ``compress``, ``eval`` and ``demo`` to the ``dsf`` app, each reporting user errors as one line."""
    app.command("compress")(user_errors(compress))
    app.command("eval")(user_errors(evaluate))
    app.command("demo")(user_errors(demo))
