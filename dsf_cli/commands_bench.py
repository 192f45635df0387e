"""``dsf bench e2e`` and ``dsf bench layer``: run the GPU benchmark scripts of ``benchmarks/`` (results under
``benchmarks/results/``) as subprocesses, so that the installed ``dsf`` command never imports ``benchmarks``.

The scripts are found beside the installed packages (a source checkout, or an install that ships ``benchmarks/``);
without them the commands stop with an error that says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path

import typer

from dsf_cli.common import check_device

__all__ = ["register"]

ROOT = Path(__file__).resolve().parents[1]  # holds benchmarks/ in a source checkout

bench = typer.Typer(
    help="Benchmarks: whole models (e2e: your own directory on CPU or GPU, or ours on the GPU) and single layers "
    "(layer, GPU).\n\nExamples:\n\n    dsf bench e2e --model runs/smol-small --batches 1,4 --device cpu\n\n"
    "    dsf bench layer --cpu-dry-run --out /tmp/layer.json",
    short_help="Benchmarks: whole models (e2e, CPU or GPU) and single layers (layer, GPU).",
    no_args_is_help=True,
)


class ShapeSet(str, Enum):
    """Shape sets of ``benchmarks/bench_layer.py``."""

    all = "all"
    llama = "llama"
    smollm2 = "smollm2"


def _csv(text: str, cast=int) -> str:
    """``text`` checked as comma-separated numbers and normalised (``"1, 8"`` -> ``"1,8"``)."""
    try:
        return ",".join(str(cast(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _run_script(name: str, args: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``python -m benchmarks.<name> args`` from ``ROOT``'s checkout (outputs relative to the current
    directory) with ``env`` added to the environment, echoing its output line by line; returns its exit code."""
    script = ROOT / "benchmarks" / f"{name}.py"
    if not script.is_file():
        typer.echo(f"error: {script} not found: `dsf bench` runs the scripts of benchmarks/, which ship with the "
                   "source checkout (git clone the project and pip install -e . there)", err=True)
        raise typer.Exit(2)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, **(env or {}), PYTHONPATH=path)
    with subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args], env=env, text=True, bufsize=1,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            typer.echo(line, nl=False)
    return proc.returncode


@bench.command("e2e")
def e2e(
    out: Path | None = typer.Option(None, "--out", help="JSON output; .md (and .png with --plot) beside it "
                                    "(default: benchmarks/results/e2e.json; with --model: none)."),
    models: str = typer.Option("llama2-7b,smollm2", "--models", help="Comma-separated: llama2-7b, smollm2."),
    densities: str = typer.Option("0.5,0.3", "--densities", help="DSF densities of the LLaMA-2-7B-shaped model."),
    batches: str = typer.Option("1,8", "--batches", help="Decode batch sizes."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(128, "--new-tokens", min=2),
    prefill_tokens: int = typer.Option(2048, "--prefill-tokens", min=0, help="0 skips the prefill rows."),
    runs: int = typer.Option(3, "--runs", min=1, help="Timed generations per row (median reported)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="Replay the decode step from a "
                                     "CUDA graph."),
    real_smollm2: bool = typer.Option(False, "--real-smollm2/--no-real-smollm2", help="Also compress SmolLM2 with "
                                      "the DSF solver and generate one greedy sentence."),
    dense_compile: str = typer.Option("max-autotune-no-cudagraphs", "--dense-compile", help="Without --model: also "
                                      "time each dense model under torch.compile with this mode (its decode step in "
                                      "the same CUDA graph) and report speedups against the faster dense variant; "
                                      "none = only the eager baseline."),
    dry_run: bool = typer.Option(False, "--dry-run", "--cpu-dry-run", help="Tiny model on the CPU: checks the code "
                                 "paths (seconds); its tables and plot say they are NOT speed measurements."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the PNG (benchmarks/plot.py)."),
    model: Path | None = typer.Option(None, "--model", help="Time your own compressed (or dense) directory "
                                      "instead, on --device, at each of --batches, against its dense baseline.",
                                      file_okay=False),
    baseline: Path | None = typer.Option(None, "--baseline", help="With --model: the dense Hugging Face directory "
                                         "to compare with (default: the manifest's base model when it is on this "
                                         "machine, else the factors multiplied out in memory).", file_okay=False),
    device: str = typer.Option("auto", "--device", help="With --model: cpu, cuda, ... (auto: cuda when available)."),
) -> None:
    """Whole-model decode tokens/s, prefill time, peak memory and weight bytes, compressed against dense.

    With --model: your own directory, on the CPU or a GPU (dsf run's timing at each of --batches). Without: the
    LLaMA-7B-shaped and SmolLM2 models on the GPU (benchmarks/bench_e2e.py: static cache, CUDA graphs).

    Examples:

        dsf bench e2e --model runs/smol-small --batches 1,4 --new-tokens 32 --device cpu

        dsf bench e2e --model runs/smol-small --baseline ~/models/SmolLM2-135M --out own.json

        dsf bench e2e --out benchmarks/results/e2e-h100.json                        (GPU, LLaMA-7B shapes)

        dsf bench e2e --cpu-dry-run --out /tmp/e2e.json                             (code paths, not speed)
    """
    if model is not None:
        _own_model(model, baseline, device, _csv(batches), prompt_tokens, new_tokens, cuda_graphs, out)
        return
    args = ["--out", str(out or "benchmarks/results/e2e.json"), "--models", models, "--densities",
            _csv(densities, float), "--batches", _csv(batches), "--prompt-tokens", str(prompt_tokens),
            "--new-tokens", str(new_tokens), "--prefill-tokens", str(prefill_tokens), "--runs", str(runs),
            "--dense-compile", dense_compile]
    args += [flag for flag, on in (("--no-cuda-graphs", not cuda_graphs), ("--real-smollm2", real_smollm2),
                                   ("--dry-run", dry_run), ("--plot", plot)) if on]
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            typer.echo("error: dsf bench e2e needs a CUDA GPU (torch sees none) unless --model DIR times your own "
                       "directory on the CPU; --cpu-dry-run checks the code paths", err=True)
            raise typer.Exit(2)
    raise typer.Exit(_run_script("bench_e2e", args))


@bench.command("layer")
def layer(
    out: Path = typer.Option(Path("benchmarks/results/layer.json"), "--out", help="JSON output; the .md table is "
                             "written beside it."),
    shapes: ShapeSet = typer.Option(ShapeSet.all, "--shapes", help="Shape set: LLaMA-7B's and/or SmolLM2's linears."),
    batches: str = typer.Option("1,16,2048,2,4,8,64,256", "--batches", help="Comma-separated batch sizes."),
    tune: bool = typer.Option(False, "--tune", help="First time the kernels' candidate configs per factor and write "
                              "the fastest into --tuning-file."),
    tune_shapes: ShapeSet = typer.Option(ShapeSet.llama, "--tune-shapes", help="Shapes to tune."),
    tuning_file: Path | None = typer.Option(None, "--tuning-file", help="Tuning JSON that --tune writes (merged into "
                                            "it if it exists; default: the shipped file of this GPU)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Graph replays per measurement (median reported)."),
    max_seconds: float = typer.Option(270.0, "--max-seconds", help="Stop starting new rows after this."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="Also time bf16 rows."),
    codes: str = typer.Option("", "--codes", metavar="<int8,fp8,int4>", help="Also time DSF rows with these value "
                              "codes (nibble layout, decoded in registers) at batches 1 and 16."),
    precompile_workers: int = typer.Option(0, "--precompile-workers", min=0, help="Compile all kernels first in "
                                           "this many processes; 0 = compile lazily while timing."),
    cpu_dry_run: bool = typer.Option(False, "--cpu-dry-run", help="Without a GPU: run the code paths on tiny shapes "
                                     "in the Triton interpreter (under a minute); its table says it is NOT a speed "
                                     "measurement."),
) -> None:
    """One layer (DSF / single sparse) against cuBLAS dense, CSR and 2:4 by batch size (GPU).

    Runs benchmarks/bench_layer.py (--tune: the kernels' tuning first).

    Examples:

        dsf bench layer --shapes llama --batches 1,16 --out benchmarks/results/layer-h100.json     (GPU)

        dsf bench layer --cpu-dry-run --out /tmp/layer.json                                        (CPU check)
    """
    args = ["--out", str(out), "--shapes", shapes.value, "--batches", _csv(batches), "--tune-shapes",
            tune_shapes.value, "--repeats", str(repeats), "--max-seconds", str(max_seconds), "--precompile-workers",
            str(precompile_workers)]
    args += ["--tuning-file", str(tuning_file)] if tuning_file is not None else []
    args += ["--codes", _csv(codes, str)] if codes else []
    args += [flag for flag, on in (("--tune", tune), ("--no-bf16", not bf16),
                                   ("--cpu-dry-run", cpu_dry_run)) if on]
    env = {"TRITON_INTERPRET": "1", "DSF_INTERPRET_KERNELS": "1"} if cpu_dry_run else None
    raise typer.Exit(_run_script("bench_layer", args, env))


def _own_model(model: Path, baseline: Path | None, device: str, batches: str, prompt_tokens: int,
               new_tokens: int, cuda_graphs: bool, out: Path | None) -> None:
    """``dsf bench e2e --model``: ``dsf run``'s timing (``commands_runtime.compare``) at each batch size with random
    prompts of ``prompt_tokens``, against the dense baseline (``resolve_baseline``; none for a dense ``model``
    without ``baseline``); prints the tables and writes them as JSON to ``out`` when given."""
    import json

    import torch
    from rich.console import Console

    from dsf_cli.commands_runtime import compare, is_compressed, print_runs, resolve_baseline

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    check_device(device)
    reference = resolve_baseline(model, baseline) if is_compressed(model) or baseline is not None else None
    vocab = json.loads((model / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    console, rows = Console(), []
    for batch in map(int, batches.split(",")):
        ids = torch.randint(3, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(batch))
        runs = compare(model, reference, ids.to(device), new_tokens, device, None, cuda_graphs)
        print_runs(console, runs, f"batch {batch}: {new_tokens} new tokens after {prompt_tokens} on {device}",
                   reference)
        rows += [{"batch": batch, **{k: str(v) if isinstance(v, Path) else v for k, v in r.items()
                                    if k not in ("ids", "eos")}} for r in runs]
    if out is not None:
        _write_rows(out, model, reference, device, rows)
        console.print(f"wrote {out}")


def _write_rows(out: Path, model: Path, reference, device: str, rows: list[dict]) -> None:
    """``{"model", "baseline" ({"source", "multiply_out", "why"} or None), "device", "rows"}`` as JSON to ``out``."""
    import json

    baseline = None if reference is None else {"source": str(reference.source),
                                               "multiply_out": reference.multiply_out, "why": reference.why}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "baseline": baseline, "device": device, "rows": rows}, indent=1))


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command group to the ``dsf`` command."""
    app.add_typer(bench, name="bench")
