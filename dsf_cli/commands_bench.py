"""``dsf bench e2e`` and ``dsf bench layer``: the GPU benchmarks of ``benchmarks/`` (results under
``benchmarks/results/``)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]

bench = typer.Typer(help="GPU benchmarks: whole models (e2e) and single layers (layer).", no_args_is_help=True)


def _csv(text: str, cast=int) -> tuple:
    try:
        return tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


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
    dry_run: bool = typer.Option(False, "--dry-run", help="Tiny model on the CPU: checks the code paths (seconds)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the PNG (benchmarks/plot.py)."),
) -> None:
    """Decode tokens/s (batch 1 and 8, static cache, CUDA graphs), prefill time, peak memory and weight bytes of
    dense vs DSF models (benchmarks/bench_e2e.py)."""
    import torch

    from benchmarks.bench_e2e import bench_e2e

    if not dry_run and not torch.cuda.is_available():
        typer.echo("error: dsf bench e2e needs a CUDA GPU (torch sees none); --dry-run checks it on the CPU", err=True)
        raise typer.Exit(2)
    bench_e2e(out=out, models=tuple(m for m in models.split(",") if m), densities=_csv(densities, float),
              batches=_csv(batches), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
              prefill_tokens=prefill_tokens, runs=runs, cuda_graphs=cuda_graphs, real_smollm2=real_smollm2,
              dry_run=dry_run, log=typer.echo)
    if plot:
        from benchmarks.plot import plot as draw

        typer.echo(f"plot: {draw(out)}")
    typer.echo(out.with_suffix(".md").read_text())


@bench.command("layer", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def layer(ctx: typer.Context) -> None:
    """One layer (DSF / single sparse) against cuBLAS, CSR and 2:4 by batch size: benchmarks/bench_layer.py; every
    option is passed through (dsf bench layer --help-layer lists them)."""
    from benchmarks import bench_layer

    args = ["--help" if a == "--help-layer" else a for a in ctx.args]
    raise typer.Exit(bench_layer.main(args))


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command group to the ``dsf`` command."""
    app.add_typer(bench, name="bench")
