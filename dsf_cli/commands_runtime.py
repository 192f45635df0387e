"""``dsf inspect DIR`` and ``dsf run --model DIR --prompt TEXT``: look into and run a compressed model directory."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from dsf_cli.common import check_device, load_tokenizer, user_errors

__all__ = ["register"]

_PACKAGED_MODEL = "smollm2-135m"  # compress.assets.PACKAGED_MODEL, repeated to keep `dsf --help` free of torch


class DType(str, Enum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def inspect(
    directory: Path = typer.Argument(
        ..., help="A compressed model directory (written by `dsf compress` or `dsf export`).", file_okay=False
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON instead of the table: {'layers': [...], 'size': {...}} with the bytes of "
        "every layer and of the whole directory against the same model dense in fp16."
    ),
) -> None:
    """Show every compressed layer: kind, method, layouts, shape, inner dim, density, bytes vs dense fp16, error;
    then the whole directory against the dense fp16 model.

    Example:

        dsf inspect runs/smol-small --json > sizes.json
    """
    from rich.console import Console
    from rich.table import Table

    from dsf_runtime.checkpoint import CheckpointError, open_compressed

    console = Console()
    try:
        ckpt = open_compressed(directory)
    except CheckpointError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    m = ckpt.manifest
    records, size = ckpt.records(), ckpt.size_summary()
    if as_json:
        import json

        typer.echo(json.dumps({"directory": str(directory), "base_model": m.get("base_model"),
                               "architecture": m.get("architecture"), "layers": records, "size": size}, indent=2))
        return
    table = Table(title=f"{directory} ({m.get('base_model') or '?'}, {m.get('architecture') or '?'})")
    for col in ("layer", "kind", "method", "layouts"):
        table.add_column(col)
    for col in ("shape", "inner", "density", "MiB", "fp16 MiB", "ratio", "rel. error"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(
            r["name"], r["kind"], str(r["method"]), r["layouts"], "×".join(map(str, r["shape"])),
            "-" if r["inner_dim"] is None else str(r["inner_dim"]),
            f"{r['density']:.3f}", _mib(r["bytes"]), _mib(r["dense_fp16_bytes"]),
            f"{r['bytes'] / r['dense_fp16_bytes']:.3f}" if r["dense_fp16_bytes"] else "-",
            "-" if r["relative_error"] is None else f"{r['relative_error']:.4g}",
        )
    stored = sum(r["bytes"] for r in records)
    dense = sum(r["dense_fp16_bytes"] for r in records)
    nnz = sum(r["nnz"] or 0 for r in records)
    elements = sum(r["shape"][0] * r["shape"][1] for r in records)
    table.add_section()
    table.add_row(
        f"total ({len(records)} layers)", "", "", "", "", "", f"{nnz / elements:.3f}" if elements else "-",
        _mib(stored), _mib(dense), f"{stored / dense:.3f}" if dense else "-", "",
    )
    console.print(table)
    console.print(f"uncompressed tensors: {len(ckpt.uncompressed_names)} ({_mib(size['other_bytes'])} MiB); "
                  f"whole directory {_mib(size['total_bytes'])} MiB = {size['ratio']:.3f}x the dense fp16 model "
                  f"({_mib(size['dense_fp16_bytes'])} MiB)")


def run(
    model: Path = typer.Option(
        ..., "--model", help="A compressed model directory (a dense Hugging Face directory runs densely).",
        file_okay=False,
    ),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Number of tokens to generate."),
    device: str = typer.Option("cpu", "--device", help="Device to load and run on: cpu, cuda, cuda:1, ..."),
    dtype: DType = typer.Option(
        DType.auto, "--dtype", help="Cast weights and activations; auto keeps the stored dtypes."
    ),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Wrap the prompt in the tokenizer's chat template."),
    cuda_graphs: bool = typer.Option(
        True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA: replay the decode step from a CUDA graph."
    ),
    dense_baseline: bool = typer.Option(
        False, "--dense-baseline", help="Also run the dense model (--baseline, else the manifest's base model when "
        "it is on this machine) and print both rows. The dense model runs in fp32 on the CPU, fp16 on CUDA, unless "
        "--dtype says otherwise.",
    ),
    baseline: Path | None = typer.Option(
        None, "--baseline", help="Dense Hugging Face directory for --dense-baseline.", file_okay=False
    ),
) -> None:
    """Generate text greedily and time it: prefill, decode tokens/s, memory and weight bytes. A compressed
    model's linears stay packed (CPU kernel; on CUDA converted once to the Triton kernels' layouts, static KV
    cache, CUDA graph).

    Example:

        dsf run --model runs/smol-small --prompt "It is a truth" --max-new-tokens 20 --dense-baseline
    """
    check_device(device)
    import torch
    from rich.console import Console

    console = Console()
    torch_dtype = None if dtype is DType.auto else getattr(torch, dtype.value)
    tokenizer = load_tokenizer(model)
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
    with_baseline = dense_baseline or baseline is not None
    runs = compare(model, baseline or (_dense_source(model) if with_baseline else None), ids, max_new_tokens,
                   device, torch_dtype, cuda_graphs)
    new = _until_eos(runs[0]["ids"][0, ids.shape[1]:], runs[0]["eos"])
    console.print(prompt, style="bold", end="" if not chat else "\n")
    console.print(tokenizer.decode(new, skip_special_tokens=True), highlight=False)
    print_runs(console, runs, f"{max_new_tokens} new tokens after {ids.shape[1]} prompt tokens on {device}")


def compare(model: Path, baseline: Path | None, ids, max_new_tokens: int, device: str, dtype, cuda_graphs: bool
            ) -> list[dict]:
    """Time greedy generation of ``model`` (``_timed_run``), then of the dense ``baseline`` when given (in fp32 on
    the CPU, fp16 on CUDA, unless ``dtype``). ``ids``: ``[batch, prompt]`` int64 on ``device``."""
    import torch

    runs = [_timed_run(model, ids, max_new_tokens, device, dtype, cuda_graphs)]
    if baseline is not None:
        dense_dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        runs.append(_timed_run(baseline, ids, max_new_tokens, device, dense_dtype, cuda_graphs, dense=True))
    return runs


def print_runs(console, runs: list[dict], title: str) -> None:
    """The table of ``compare``'s runs, and the compressed/dense ratios when there is a dense row."""
    from rich.table import Table

    memory = "peak CUDA MiB" if str(runs[0]["device"]).startswith("cuda") else "RSS growth MiB"
    table = Table(title=title)
    for column in ("model", "kind"):
        table.add_column(column)
    for column in ("weights MiB", "load s", "prefill ms", "decode tok/s", memory):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(str(r["source"]), r["kind"], _mib(r["weight_bytes"]), f"{r['load_s']:.2f}",
                      f"{r['prefill_ms']:.1f}", f"{r['tok_s']:.2f}", _mib(r["memory"]))
    console.print(table)
    if len(runs) == 2 and runs[1]["tok_s"] > 0:
        console.print(f"compressed vs dense: {runs[0]['tok_s'] / runs[1]['tok_s']:.2f}x decode tokens/s, "
                      f"{runs[0]['weight_bytes'] / runs[1]['weight_bytes']:.3f}x weight bytes")


def _dense_source(model: Path) -> Path:
    """The dense model a compressed directory came from, when it is on this machine: the manifest's
    ``base_model`` as a directory, or the packaged SmolLM2.

    Raises:
        ValueError: no dense model to compare with, naming the fix (--baseline).
    """
    import json

    from dsf_runtime.checkpoint import MANIFEST_NAME

    manifest = model / MANIFEST_NAME
    base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model") if manifest.is_file() else None
    if base == _PACKAGED_MODEL:
        from compress.assets import smollm2_dir

        return smollm2_dir()
    if base and (Path(base) / "config.json").is_file():
        return Path(base)
    raise ValueError(f"--dense-baseline: {model}'s base model {base!r} is not a directory on this machine; pass "
                     "--baseline DENSE_DIR (a Hugging Face directory, e.g. from `dsf export --dense-fallback`)")


def _timed_run(source: Path, ids, max_new_tokens: int, device: str, dtype, cuda_graphs: bool,
               dense: bool = False) -> dict:
    """Load ``source`` (compressed, or dense when it has no manifest or ``dense``), generate greedily with a
    progress bar and return the timings: ``source``, ``kind``, ``ids``, ``eos``, ``weight_bytes``, ``load_s``,
    ``prefill_ms``, ``tok_s`` and ``memory`` (peak CUDA bytes, or the growth of the resident set on the CPU)."""
    import gc
    import os
    import time

    import torch
    from rich.console import Console
    from rich.progress import Progress

    from dsf_runtime.checkpoint import MANIFEST_NAME
    from dsf_runtime.generation import greedy_generate

    cuda = torch.device(device).type == "cuda"
    compressed = not dense and (source / MANIFEST_NAME).is_file()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss = _rss_bytes()
    start = time.perf_counter()
    if compressed:
        from dsf_runtime.loader import from_pretrained

        net = from_pretrained(source, device=device, dtype=dtype)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", trust_remote_code=False)
        net = net.to(device).eval()
    load_s = time.perf_counter() - start
    seen, weight_bytes = set(), 0
    for t in [*net.parameters(), *net.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weight_bytes += t.numel() * t.element_size()
    kind = "compressed" if compressed else "dense"
    stderr = Console(stderr=True)
    with Progress(console=stderr, transient=True, disable=not stderr.is_terminal) as bar, torch.inference_mode():
        task = bar.add_task(f"{kind} {source.name}", total=max_new_tokens)
        result = greedy_generate(net, ids, max_new_tokens, cuda_graphs=cuda_graphs,
                                 on_token=lambda: bar.advance(task))
    memory = torch.cuda.max_memory_allocated(device) if cuda else max(_rss_bytes() - rss, 0)
    run = {"source": source, "device": device, "kind": f"{kind} {next(net.parameters()).dtype}".replace("torch.", ""),
           "ids": result.ids.cpu(), "eos": net.generation_config.eos_token_id, "weight_bytes": weight_bytes,
           "load_s": load_s, "prefill_ms": result.prefill_ms, "tok_s": result.decode_tokens_per_s, "memory": memory}
    del net
    return run


def _rss_bytes() -> int:
    """Resident set size of this process (``VmRSS`` of /proc/self/status; 0 where there is none)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _until_eos(tokens, eos):
    """``tokens`` cut before the first end-of-sequence token (``eos``: an id, a list of ids, or None)."""
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for i, t in enumerate(tokens.tolist()):
        if t in ids:
            return tokens[:i]
    return tokens


def register(app: typer.Typer) -> None:
    """Add ``inspect`` and ``run`` to the ``dsf`` command, each reporting user errors as one line."""
    app.command("inspect")(user_errors(inspect))
    app.command("run")(user_errors(run))
