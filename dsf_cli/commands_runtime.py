"""``dsf inspect DIR`` and ``dsf run --model DIR --prompt TEXT``: look into and run a compressed model directory."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from dsf_cli.common import check_device, load_tokenizer, user_errors

__all__ = ["register"]


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
) -> None:
    """Show every compressed layer: kind, method, layouts, shape, inner dim, density, bytes vs dense fp16, error."""
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
    table = Table(title=f"{directory} ({m.get('base_model') or '?'}, {m.get('architecture') or '?'})")
    for col in ("layer", "kind", "method", "layouts"):
        table.add_column(col)
    for col in ("shape", "inner", "density", "MiB", "fp16 MiB", "ratio", "rel. error"):
        table.add_column(col, justify="right")
    records = ckpt.records()
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
    other = ckpt.tensor_bytes()
    rest = sum(other[n] for n in ckpt.uncompressed_names)
    console.print(f"uncompressed tensors: {len(ckpt.uncompressed_names)} ({_mib(rest)} MiB)")


def run(
    model: Path = typer.Option(..., "--model", help="A compressed model directory.", file_okay=False),
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
) -> None:
    """Generate text greedily with a compressed model; its linears stay compressed (on CUDA: converted once to the
    Triton kernels' layouts, static KV cache, timing printed)."""
    check_device(device)
    import torch
    from rich.console import Console

    from dsf_runtime.loader import from_pretrained

    console = Console()
    torch_dtype = None if dtype is DType.auto else getattr(torch, dtype.value)
    net = from_pretrained(model, device=device, dtype=torch_dtype)  # a CheckpointError: one line (user_errors)
    tokenizer = load_tokenizer(model)
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    timing = None
    if torch.device(device).type == "cuda":
        from dsf_runtime.generation import greedy_generate

        result = greedy_generate(net, inputs["input_ids"], max_new_tokens, cuda_graphs=cuda_graphs)
        new = _until_eos(result.ids[0, inputs["input_ids"].shape[1]:], net.generation_config.eos_token_id)
        timing = (f"prefill {result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s "
                  f"({'CUDA graph' if result.cuda_graphs else 'eager'})")
    else:
        with torch.inference_mode():
            out = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
    console.print(prompt, style="bold", end="" if not chat else "\n")
    console.print(tokenizer.decode(new, skip_special_tokens=True), highlight=False)
    if timing:
        console.print(timing, style="dim")


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
