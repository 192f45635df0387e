"""``dsf inspect DIR`` and ``dsf run --model DIR --prompt TEXT``: look into and run a compressed model directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import typer

from dsf_cli.common import check_device, fail, load_tokenizer, user_errors

__all__ = ["Baseline", "compare", "is_compressed", "print_runs", "register", "resolve_baseline"]

# Repeated from compress.assets.PACKAGED_MODEL and dsf_runtime.checkpoint.MANIFEST_NAME to keep `dsf --help` free
# of torch.
_PACKAGED_MODEL = "smollm2-135m"
_MANIFEST = "dsf_manifest.json"


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
    """Show every compressed layer and the whole directory, bytes against the dense fp16 model.

    Per layer: kind, method, layouts, shape, inner dim, density, bytes, dense fp16 bytes, ratio, error; then the
    total of the layers and the whole directory (embeddings, norms, ... included). --json prints the same.

    Example:

        dsf inspect runs/smol-small --json > sizes.json
    """
    report = _size_report(directory)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_size_report(report)


def _size_report(directory: Path) -> dict:
    """What ``dsf inspect`` shows: ``directory``, ``base_model``, ``architecture``, ``layers`` (the checkpoint's
    records plus ``ratio`` = bytes / dense fp16 bytes) and ``size`` (``size_summary`` plus the number of
    ``uncompressed_tensors``).

    Raises:
        typer.Exit: the directory is not a complete compressed directory (one ``error:`` line naming why).
    """
    from dsf_runtime.checkpoint import CheckpointError, open_compressed

    try:
        ckpt = open_compressed(directory)
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    with ckpt:
        records = [dict(r, ratio=r["bytes"] / r["dense_fp16_bytes"] if r["dense_fp16_bytes"] else None)
                   for r in ckpt.records()]
        size = dict(ckpt.size_summary(), uncompressed_tensors=len(ckpt.uncompressed_names))
        m = ckpt.manifest
    return {"directory": str(directory), "base_model": m.get("base_model"), "architecture": m.get("architecture"),
            "layers": records, "size": size}


def _print_size_report(report: dict) -> None:
    """``_size_report`` as a table, a total row for the compressed layers, and a line for the whole directory."""
    from rich.console import Console
    from rich.table import Table

    records, size = report["layers"], report["size"]
    table = Table(title=f"{report['directory']} ({report['base_model'] or '?'}, {report['architecture'] or '?'})")
    for col in ("layer", "kind", "method", "layouts"):
        table.add_column(col)
    for col in ("shape", "inner", "density", "MiB", "fp16 MiB", "ratio", "rel. error"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(
            r["name"], r["kind"], str(r["method"]), r["layouts"], "×".join(map(str, r["shape"])),
            "-" if r["inner_dim"] is None else str(r["inner_dim"]),
            f"{r['density']:.3f}", _mib(r["bytes"]), _mib(r["dense_fp16_bytes"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
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
    console = Console()
    console.print(table)
    console.print(f"uncompressed tensors: {size['uncompressed_tensors']} ({_mib(size['other_bytes'])} MiB); "
                  f"whole directory {_mib(size['total_bytes'])} MiB = {size['ratio']:.3f}x the dense fp16 model "
                  f"({_mib(size['dense_fp16_bytes'])} MiB)")


def run(
    model: Path = typer.Option(
        ..., "--model", help="A compressed model directory; a dense Hugging Face directory runs densely (to compare).",
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
        False, "--dense-baseline", help="Also run the dense equivalent and print both rows and the ratios: "
        "--baseline DIR, else the manifest's base model when it is on this machine (same shapes), else the factors "
        "multiplied out in memory; the output says which. It runs in fp32 on the CPU, fp16 on CUDA, unless --dtype.",
    ),
    baseline: Path | None = typer.Option(
        None, "--baseline", help="Dense Hugging Face directory to compare with (implies --dense-baseline).",
        file_okay=False,
    ),
) -> None:
    """Generate text greedily and time it, optionally against the dense model.

    Prints load time, prefill time, decode tokens/s, peak memory (CUDA: max allocated; CPU: peak resident set of
    the process) and weight bytes, with a progress bar while generating. A compressed model's linears stay packed
    (CPU kernel; on CUDA converted once to the Triton kernels' layouts, static KV cache, CUDA graph).

    Examples:

        dsf run --model runs/smol-small --prompt "It is a truth" --max-new-tokens 20 --dense-baseline

        dsf run --model runs/smol-small --prompt "Hi" --device cuda --baseline ~/models/SmolLM2-135M
    """
    check_device(device)
    import torch
    from rich.console import Console

    console = Console()
    torch_dtype = None if dtype is DType.auto else getattr(torch, dtype.value)
    reference = resolve_baseline(model, baseline) if dense_baseline or baseline is not None else None
    tokenizer = load_tokenizer(model)
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
    if not is_compressed(model):
        console.print(f"{model}: a dense Hugging Face directory (no {_MANIFEST}): running it densely")
    runs = compare(model, reference, ids, max_new_tokens, device, torch_dtype, cuda_graphs)
    new = _until_eos(runs[0]["ids"][0, ids.shape[1]:], runs[0]["eos"])
    console.print(prompt, style="bold", end="" if not chat else "\n")
    console.print(tokenizer.decode(new, skip_special_tokens=True), highlight=False)
    print_runs(console, runs, f"{max_new_tokens} new tokens after {ids.shape[1]} prompt tokens on {device}",
               reference)


@dataclass(frozen=True)
class Baseline:
    """The dense model a run is compared with.

    Attributes:
        source: a dense Hugging Face directory, or (``multiply_out``) the compressed directory whose factors are
            multiplied out in memory.
        multiply_out: build the dense model from ``source``'s factors (``W = A·B`` in fp32) instead of loading it.
        why: one line for the output: which dense model this is and why it was chosen.
    """

    source: Path
    multiply_out: bool
    why: str


def is_compressed(directory: Path) -> bool:
    """Whether ``directory`` is a compressed directory (it has a manifest); otherwise it is taken as dense."""
    return (directory / _MANIFEST).is_file()


def resolve_baseline(model: Path, baseline: Path | None) -> Baseline:
    """The dense model to compare ``model`` with: ``baseline`` when given; else the manifest's ``base_model`` when
    it is on this machine with ``model``'s shapes (the packaged SmolLM2, or a directory); else ``model``'s own
    factors multiplied out in memory (the same shapes and outputs as the compressed model, dense).

    Raises:
        ValueError: ``baseline`` is not a dense Hugging Face directory, or ``model`` is itself dense and no
            ``baseline`` was given; naming the fix.
    """
    if baseline is not None:
        if is_compressed(baseline) or not (baseline / "config.json").is_file():
            raise ValueError(f"--baseline {baseline}: not a dense Hugging Face directory (it needs config.json and "
                             f"weights, and no {_MANIFEST}); pass the dense model the compressed one came from")
        return Baseline(baseline, False, f"dense baseline: {baseline} (--baseline)")
    if not is_compressed(model):
        raise ValueError(f"--dense-baseline: {model} is already dense (no {_MANIFEST}); pass a compressed --model, "
                         "or compare two directories with `dsf run --model COMPRESSED --baseline DENSE`")
    base = json.loads((model / _MANIFEST).read_text(encoding="utf-8")).get("base_model")
    found, reason = _base_directory(base, model)
    if found is not None:
        return Baseline(found, False, f"dense baseline: the base model {found} (the manifest's base_model)")
    return Baseline(model, True, f"dense baseline: {model}'s factors multiplied out in memory ({reason})")


def _base_directory(base: str | None, model: Path) -> tuple[Path | None, str]:
    """The manifest's ``base_model`` as a local directory with ``model``'s shapes, or None and why not."""
    if not base:
        return None, "the manifest records no base model"
    if base == _PACKAGED_MODEL:
        from compress.assets import smollm2_dir

        try:
            found = smollm2_dir()
        except (OSError, ImportError, ValueError) as exc:
            return None, f"the packaged SmolLM2 is not available: {exc}"
    else:
        found = Path(base).expanduser()
        if not (found / "config.json").is_file():
            return None, f"its base model {base!r} is not a directory on this machine"
    if _shapes(found) != _shapes(model):
        return None, f"its base model {str(found)!r} has other shapes (a different or cut model)"
    return found, ""


_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads")


def _shapes(directory: Path) -> dict:
    """The fields of ``directory``'s ``config.json`` that fix the model's tensor shapes."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return {key: config.get(key) for key in _SHAPE_FIELDS}


def compare(model: Path, baseline: Baseline | None, ids, max_new_tokens: int, device: str, dtype,
            cuda_graphs: bool) -> list[dict]:
    """Time greedy generation of ``model`` (compressed, or dense without a manifest), then of the dense
    ``baseline`` when given (in fp32 on the CPU, fp16 on CUDA, unless ``dtype``). ``ids``: ``[batch, prompt]``
    int64 on ``device``."""
    import torch

    route = "compressed" if is_compressed(model) else "dense"
    runs = [_timed_run(model, route, ids, max_new_tokens, device, dtype, cuda_graphs)]
    if baseline is not None:
        dense_dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        route = "multiplied out" if baseline.multiply_out else "dense"
        runs.append(_timed_run(baseline.source, route, ids, max_new_tokens, device, dense_dtype, cuda_graphs))
    return runs


def print_runs(console, runs: list[dict], title: str, baseline: Baseline | None = None) -> None:
    """The table of ``compare``'s runs; with a dense row, which baseline it is and the compressed/dense ratios."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("model", "kind"):
        table.add_column(column)
    for column in ("weights MiB", "load s", "prefill ms", "decode tok/s", _memory_label(runs[0]["device"]),
                   "added MiB"):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(str(r["source"]), r["kind"], _mib(r["weight_bytes"]), f"{r['load_s']:.2f}",
                      f"{r['prefill_ms']:.1f}", f"{r['tok_s']:.2f}", _mib(r["memory"]) if r["memory"] else "-",
                      _mib(r["memory_added"]) if r["memory"] else "-")
    console.print(table)
    if not str(runs[0]["device"]).startswith("cuda"):
        console.print("peak RSS: the whole process; added: above its resident set before the load (the first row "
                      "also holds one-time imports)", highlight=False)
    if baseline is not None:
        console.print(baseline.why, highlight=False)
    if len(runs) == 2:
        console.print(_ratios(*runs), highlight=False)


def _memory_label(device: str) -> str:
    return "peak CUDA MiB" if str(device).startswith("cuda") else "peak RSS MiB"


def _ratios(ours: dict, dense: dict) -> str:
    """``compressed vs dense: ...`` of two runs: decode tok/s, weight bytes, prefill time and, on CUDA, the peak
    memory that loading and generating allocated. (On the CPU the resident set also holds what the first run
    imported and the allocator kept, so its ratio would mislead on a small model: the table shows both rows.)"""
    cuda = str(ours["device"]).startswith("cuda") and ours["memory_added"] and dense["memory_added"]
    parts = [f"{ours['tok_s'] / dense['tok_s']:.2f}x decode tokens/s" if dense["tok_s"] else None,
             f"{ours['weight_bytes'] / dense['weight_bytes']:.3f}x weight bytes",
             f"{ours['prefill_ms'] / dense['prefill_ms']:.2f}x prefill time" if dense["prefill_ms"] else None,
             f"{ours['memory_added'] / dense['memory_added']:.2f}x peak CUDA memory" if cuda else None]
    return "compressed vs dense: " + ", ".join(p for p in parts if p)


def _load(source: Path, route: str, device: str, dtype):
    """The model of ``source`` in eval mode on ``device``: ``compressed`` (``dsf_runtime.from_pretrained``),
    ``dense`` (transformers) or ``multiplied out`` (a compressed directory made dense on the CPU by
    ``_multiply_out``, then moved)."""
    if route == "compressed":
        from dsf_runtime.loader import from_pretrained

        return from_pretrained(source, device=device, dtype=dtype)
    if route == "multiplied out":
        from dsf_runtime.loader import from_pretrained

        return _multiply_out(from_pretrained(source, dtype=dtype, kernels=False)).to(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the generation's bar is the one to watch
    net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", trust_remote_code=False)
    return net.to(device).eval()


def _multiply_out(net):
    """``net`` with every compressed linear replaced by the ``nn.Linear`` of its weight (its factors' product,
    computed in fp32 and stored in the factors' compute dtype: the scales' for int8/fp8 codes)."""
    import functools

    import torch
    from torch import nn

    from dsf_runtime.modules import FactorizedLinear, SparseLinear

    for name, module in list(net.named_modules()):
        if not isinstance(module, (FactorizedLinear, SparseLinear)):
            continue
        factors = module.factors()
        weight = functools.reduce(torch.matmul, [f.to_dense(torch.float32) for f in factors])
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(factors[0].compute_dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        net.set_submodule(name, linear)
    return net


def _timed_run(source: Path, route: str, ids, max_new_tokens: int, device: str, dtype, cuda_graphs: bool) -> dict:
    """Load ``source`` by ``route`` (``_load``), generate greedily with a progress bar and return the timings:
    ``source``, ``device``, ``route``, ``kind``, ``ids``, ``eos``, ``weight_bytes``, ``load_s``, ``prefill_ms``,
    ``tok_s``, ``memory`` (the peak while generating, with the model loaded: max allocated CUDA bytes, or the
    resident set of this process on the CPU; 0 where unknown) and ``memory_added`` (``memory`` minus what was in
    use before the load). Load-time transients (a conversion, a multiplication) are not in the peak."""
    import gc
    import time

    import torch
    from rich.console import Console
    from rich.progress import Progress

    from dsf_runtime.generation import greedy_generate

    gc.collect()
    before = _memory_in_use(device)
    start = time.perf_counter()
    net = _load(source, route, device, dtype)
    load_s = time.perf_counter() - start
    gc.collect()
    _reset_peak(device)
    stderr = Console(stderr=True)
    with Progress(console=stderr, transient=True, disable=not stderr.is_terminal) as bar, torch.inference_mode():
        task = bar.add_task(f"{route} {source.name}", total=max_new_tokens)
        result = greedy_generate(net, ids, max_new_tokens, cuda_graphs=cuda_graphs,
                                 on_token=lambda: bar.advance(task))
    memory = _peak(device)
    kind = {"compressed": "compressed", "dense": "dense"}.get(route, f"dense ({route})")
    run = {"source": source, "device": device, "route": route,
           "kind": f"{kind} {_float_dtype(net)}".replace("torch.", ""), "ids": result.ids.cpu(),
           "eos": net.generation_config.eos_token_id, "weight_bytes": _weight_bytes(net), "load_s": load_s,
           "prefill_ms": result.prefill_ms, "tok_s": result.decode_tokens_per_s, "memory": memory,
           "memory_added": max(memory - before, 0)}
    del net
    return run


def _weight_bytes(net) -> int:
    """Bytes of ``net``'s parameters and buffers, each storage counted once (tied embeddings)."""
    seen, total = set(), 0
    for t in [*net.parameters(), *net.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _memory_in_use(device: str) -> int:
    """Bytes allocated on a CUDA ``device`` (after emptying the cache), else this process's resident set."""
    import torch

    if torch.device(device).type != "cuda":
        return _proc_status_bytes("VmRSS")
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def _reset_peak(device: str) -> None:
    """Start a new peak: CUDA's peak allocation, or this process's peak resident set (``VmHWM``, through Linux's
    ``/proc/self/clear_refs``; elsewhere the peak stays the one since the process started)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass


def _peak(device: str) -> int:
    """The peak since ``_reset_peak``: max allocated CUDA bytes, or the peak resident set (0 where unknown)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    """``field`` of /proc/self/status in bytes (``VmRSS``: resident set, ``VmHWM``: its peak); 0 where there is
    none."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
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


def _float_dtype(net) -> torch.dtype | None:
    """The dtype of ``net``'s first floating parameter (an int8 embedding or int8 codes come first in some models)."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
