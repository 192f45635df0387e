"""``dsf bench e2e`` and ``dsf bench layer``: run the GPU benchmark scripts of ``benchmarks/`` (results under
``benchmarks/results/``) as subprocesses, so that the installed ``dsf`` command never imports ``benchmarks``.

The scripts are found beside the installed packages (a source checkout, or an install that ships ``benchmarks/``);
without them the commands stop with an error that says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

__all__ = ["register"]

ROOT = Path(__file__).resolve().parents[1]  # holds benchmarks/ in a source checkout

bench = typer.Typer(help="GPU benchmarks: whole models (e2e) and single layers (layer).", no_args_is_help=True)


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
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    with subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args], env=env, text=True, bufsize=1,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            typer.echo(line, nl=False)
    return proc.returncode


@bench.command("e2e")
def e2e(
    out: Path = typer.Option(Path("benchmarks/results/e2e.json"), "--out", help="JSON output; .md (and .png with "
                             "--plot) beside it."),
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
    dry_run: bool = typer.Option(False, "--dry-run", help="Tiny model on the CPU: checks the code paths (seconds); "
                                 "its tables and plot say they are not speed measurements."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the PNG (benchmarks/plot.py)."),
    model: Path | None = typer.Option(None, "--model", help="Benchmark your own compressed (or dense) directory "
                                      "instead, on --device, at each of --batches.", file_okay=False),
    baseline: Path | None = typer.Option(None, "--baseline", help="With --model: the dense Hugging Face directory "
                                         "to compare with (default: the manifest's base model when it is here).",
                                         file_okay=False),
    device: str = typer.Option("auto", "--device", help="With --model: cpu, cuda, ... (auto: cuda when available)."),
) -> None:
    """Decode tokens/s (batch 1 and 8, static cache, CUDA graphs), prefill time, peak memory and weight bytes of
    dense vs DSF models (benchmarks/bench_e2e.py); with --model, of your own directory against its dense model.

    Examples:

        dsf bench e2e --model runs/smol-small --batches 1 --new-tokens 32           (CPU or GPU)

        dsf bench e2e --out benchmarks/results/e2e-h100.json                        (GPU, LLaMA-7B shapes)
    """
    if model is not None:
        _own_model(model, baseline, device, _csv(batches), prompt_tokens, new_tokens, cuda_graphs, out)
        return
    args = ["--out", str(out), "--models", models, "--densities", _csv(densities, float), "--batches", _csv(batches),
            "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--prefill-tokens",
            str(prefill_tokens), "--runs", str(runs)]
    args += [flag for flag, on in (("--no-cuda-graphs", not cuda_graphs), ("--real-smollm2", real_smollm2),
                                   ("--dry-run", dry_run), ("--plot", plot)) if on]
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            typer.echo("error: dsf bench e2e needs a CUDA GPU (torch sees none); --dry-run checks it on the CPU",
                       err=True)
            raise typer.Exit(2)
    raise typer.Exit(_run_script("bench_e2e", args))


@bench.command("layer", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
               add_help_option=False)
def layer(ctx: typer.Context) -> None:
    """One layer (DSF / single sparse) against cuBLAS, CSR and 2:4 by batch size, and the kernels' tuning
    (--tune): benchmarks/bench_layer.py; every option is passed through (--help lists them). --cpu-dry-run runs
    the code paths on tiny shapes in the Triton interpreter (under a minute, not a speed measurement).

    Examples: dsf bench layer --shapes llama --batches 1,16 --out benchmarks/results/layer.json;
    dsf bench layer --cpu-dry-run --out /tmp/layer.json
    """
    args = list(ctx.args)
    env = {"TRITON_INTERPRET": "1", "DSF_INTERPRET_KERNELS": "1"} if "--cpu-dry-run" in args else None
    raise typer.Exit(_run_script("bench_layer", args, env))


def _own_model(model: Path, baseline: Path | None, device: str, batches: str, prompt_tokens: int,
               new_tokens: int, cuda_graphs: bool, out: Path) -> None:
    """``dsf bench e2e --model``: ``dsf run``'s timing (``commands_runtime.compare``) at each batch size with random
    prompts of ``prompt_tokens``; prints the tables and writes them as JSON to ``out``."""
    import json

    import torch
    from rich.console import Console

    from dsf_cli.commands_runtime import _dense_source, compare, print_runs
    from dsf_cli.common import check_device

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    check_device(device)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model, trust_remote_code=False).vocab_size
    dense = baseline or _dense_source(model)
    console, rows = Console(), []
    for batch in map(int, batches.split(",")):
        ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
        runs = compare(model, dense, ids, new_tokens, device, None, cuda_graphs)
        print_runs(console, runs, f"batch {batch}: {new_tokens} new tokens after {prompt_tokens} on {device}")
        rows += [{"batch": batch, **{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()
                                    if k not in ("ids", "eos")}} for r in runs]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "baseline": str(dense), "device": device, "rows": rows},
                              indent=1))
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command group to the ``dsf`` command."""
    app.add_typer(bench, name="bench")
