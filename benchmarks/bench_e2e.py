"""End to end: how fast does a whole DSF model decode and prefill on one GPU, against the same model dense?

One unattended run (``dsf bench e2e`` or ``python -m benchmarks.bench_e2e --out benchmarks/results/e2e-h100.json``):

(a) ``llama2-7b``: a LLaMA-2-7B-shaped fp16 model with random weights built on the GPU, measured dense, then with
    every decoder linear replaced by random DSF factors with balanced masks at total density 0.5 and 0.3 (the
    split ``propose_balanced_split`` gives; ``nnz_density`` records what it holds), converted once to the
    ``nibble`` kernel layout;
(b) ``smollm2``: the real SmolLM2-135M dense, and compressed (random balanced DSF 0.5) through a compressed
    directory and ``from_pretrained(device="cuda")`` (the loader's own conversion);
(c) optionally (``--real-smollm2``) SmolLM2 really compressed by the DSF solver, one greedy sentence from it.

Per variant and batch: greedy decode of ``--new-tokens`` after a ``--prompt-tokens`` random prompt with a static
KV cache, the decode step replayed from a CUDA graph (``dsf_runtime.generation``), one warm-up generation, then the
median of ``--runs``; prefill of ``--prefill-tokens`` tokens (batch 1); peak allocated GPU memory; weight bytes.
With ``--dense-compile MODE`` (default ``max-autotune-no-cudagraphs``; ``none`` skips it) every dense model is also
measured under ``torch.compile(mode=MODE)``, its decode step captured in the same CUDA graph (variant
``dense-compiled``), and ``speedup_vs_dense`` is against the faster of the two dense variants (``baseline_variant``
names it; ``speedup_vs_dense_eager`` is against the eager one). The DSF variants run eagerly (their Triton kernels
are opaque to ``torch.compile``), in the same CUDA graph.
Rows: ``{"model", "variant", "density", "nnz_density", "phase" ("decode"/"prefill"), "batch", "tokens",
"decode_tok_s", "decode_step_ms", "prefill_ms", "peak_mem_bytes", "weight_bytes", "linear_bytes", "cuda_graphs",
"speedup_vs_dense", "weight_ratio_vs_dense", ...}``. ``--dry-run`` runs a tiny model on the CPU in seconds (the
timings mean nothing; it checks the code paths and the schema).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DRY_RUN_CAVEAT, caveat_lines, run_meta  # noqa: E402
from benchmarks.e2e_models import (  # noqa: E402
    LLAMA2_7B,
    TINY_LLAMA,
    build_random_llama,
    compress_in_place,
    compress_to_directory,
    weight_bytes,
)
from dsf_runtime.generation import greedy_generate, release_compiled, time_prefill  # noqa: E402

__all__ = ["bench_e2e", "markdown", "main", "merge"]

SENTENCE_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"


# ---------------------------------------------------------------------------------------------- measuring
def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _layouts(model) -> dict:
    """How many factors of each layout the model holds (the kernels' ``nibble``, ``delta``, ``dense``, or the stored
    ``bitmask``, ``csr``, ``bsr`` of the pure-torch path)."""
    from dsf_runtime.modules import PackedFactor

    return dict(Counter(m.layout for m in model.modules() if isinstance(m, PackedFactor)))


def measure(model, *, base: dict, batches, prompt_tokens: int, new_tokens: int, prefill_tokens: int, runs: int,
            cuda_graphs: bool, log: Callable[[str], None], compile_mode: str | None = None) -> list[dict]:
    """Decode rows (one per batch) and a prefill row for one model variant (through ``torch.compile`` with
    ``compile_mode``); ``base`` fields go into every row."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    sizes = weight_bytes(model)
    common = dict(base, weight_bytes=sizes["total"], linear_bytes=sizes["linear"], layouts=_layouts(model),
                  device_type=device.type, compile_mode=compile_mode)
    gen_kw = dict(cuda_graphs=cuda_graphs, compile_mode=compile_mode)
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, prompt_tokens), generator=gen).to(device)
        greedy_generate(model, ids, new_tokens, **gen_kw)  # warm-up: compiles, allocates
        _peak_reset(device)
        results = [greedy_generate(model, ids, new_tokens, **gen_kw) for _ in range(runs)]
        peak = _peak(device)
        med = sorted(results, key=lambda r: r.decode_tokens_per_s)[len(results) // 2]
        row = dict(common, phase="decode", batch=batch, tokens=prompt_tokens, new_tokens=new_tokens,
                   decode_tok_s=med.decode_tokens_per_s, decode_step_ms=med.decode_ms / max(med.decode_steps, 1),
                   prompt_prefill_ms=sorted(r.prefill_ms for r in results)[len(results) // 2],
                   prefill_ms=None, peak_mem_bytes=peak, cuda_graphs=all(r.cuda_graphs for r in results),
                   graph_error=next((r.graph_error for r in results if r.graph_error), None),
                   runs_tok_s=[r.decode_tokens_per_s for r in results], sample_ids=med.ids[0, -8:].tolist())
        rows.append(row)
        log(_fmt(row))
    if prefill_tokens:
        _peak_reset(device)
        p = time_prefill(model, prefill_tokens, runs=runs, compile_mode=compile_mode)
        row = dict(common, phase="prefill", batch=1, tokens=prefill_tokens, new_tokens=0, decode_tok_s=None,
                   decode_step_ms=None, prompt_prefill_ms=None, prefill_ms=p["ms"], peak_mem_bytes=_peak(device),
                   cuda_graphs=False, graph_error=None, runs_ms=p["runs_ms"])
        rows.append(row)
        log(_fmt(row))
    return rows


def _fmt(r: dict) -> str:
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    what = (f"{r['decode_tok_s']:.1f} tok/s ({r['decode_step_ms']:.2f} ms/step, graphs={r['cuda_graphs']})"
            if r["phase"] == "decode" else f"{r['prefill_ms']:.1f} ms")
    return (f"{r['model']:10} {r['variant']:14} {r['phase']:7} b={r['batch']:<2} t={r['tokens']:<5} {what}  "
            f"weights {gib(r['weight_bytes'])} GiB  peak {gib(r['peak_mem_bytes'])} GiB")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- sections
def dense_rows(model, name: str, dense_compile: str | None, log, **kw) -> list[dict]:
    """The dense model's rows: eager (variant ``dense``), then under ``torch.compile(mode=dense_compile)``
    (``dense-compiled``) unless that is None."""
    base = dict(model=name, variant="dense", density=1.0, nnz_density=1.0)
    rows = measure(model, base=base, log=log, **kw)
    if dense_compile:
        t = time.time()
        try:
            rows += measure(model, base=dict(base, variant="dense-compiled"), log=log, compile_mode=dense_compile,
                            **kw)
            log(f"{name} dense under torch.compile({dense_compile!r}): {time.time() - t:.0f}s with the compiles")
        except Exception as exc:  # noqa: BLE001 - keep the other rows; the eager dense row stays the baseline
            log(f"{name} dense under torch.compile({dense_compile!r}) failed, eager baseline only: "
                f"{type(exc).__name__}: {exc}")
        finally:
            release_compiled(model)
            torch._dynamo.reset()
    return rows


def llama_section(shape_name: str, shape: dict, device, dtype, densities, log, dense_compile: str | None = None,
                  **kw) -> list[dict]:
    """(a): the model dense (eager, and compiled with ``dense_compile``), then random balanced DSF at each
    density, converted in place."""
    t = time.time()
    model = build_random_llama(shape, device, dtype)
    log(f"built {shape_name} on {device} in {time.time() - t:.1f}s")
    rows = dense_rows(model, shape_name, dense_compile, log, **kw)
    for d in densities:
        t = time.time()
        info = compress_in_place(model, d)
        _free(device)
        log(f"compressed {shape_name} to DSF {d} (nnz density {info['nnz_density']:.3f}) in {time.time() - t:.1f}s")
        base = dict(model=shape_name, variant=f"dsf-{d}", density=d, nnz_density=info["nnz_density"],
                    splits=info["splits"])
        rows += measure(model, base=base, log=log, **kw)
    del model
    _free(device)
    return rows


def loader_section(name: str, dense, config_source, device, dtype, densities, workdir: Path, log,
                   dense_compile: str | None = None, **kw) -> list[dict]:
    """(b): ``dense`` (on ``device``) measured (eager, and compiled with ``dense_compile``), then random balanced DSF
    written as a compressed directory and loaded back with ``from_pretrained(device=...)``."""
    from dsf_runtime import from_pretrained

    rows = dense_rows(dense, name, dense_compile, log, **kw)
    for d in densities:
        info = compress_to_directory(dense, d, workdir / f"{name}-dsf-{d}", config_source)
        t = time.time()
        model = from_pretrained(info["directory"], device=device, dtype=dtype)
        log(f"loaded {name} DSF {d} with from_pretrained in {time.time() - t:.1f}s: {_layouts(model)}")
        base = dict(model=name, variant=f"dsf-{d}", density=d, nnz_density=info["nnz_density"], via="from_pretrained")
        rows += measure(model, base=base, log=log, **kw)
        del model
        _free(device)
    return rows


def real_sentence(device, dtype, workdir: Path, *, density: float = 0.5, new_tokens: int = 24, samples: int = 32,
                  seqlen: int = 256, iters: int | None = None, log=print) -> dict:
    """(c): compress the real SmolLM2 with the DSF solver (``compress.api.compress_model``), load it with
    ``from_pretrained`` and generate one greedy sentence; the dense model's sentence for comparison."""
    from transformers import AutoModelForCausalLM

    from compress.api import CompressConfig, compress_model
    from compress.assets import smollm2_dir
    from dsf_runtime import from_pretrained, load_tokenizer

    options = {"iters": iters} if iters else {}
    config = CompressConfig(method="dsf", density=density, samples=samples, seqlen=seqlen, device=str(device),
                            solver_options=options)
    t = time.time()
    report = compress_model(config, workdir, overwrite=True, progress=False)
    compress_s = time.time() - t
    log(f"compressed SmolLM2 with DSF {density} in {compress_s:.0f}s")
    tok = load_tokenizer(workdir)
    ids = tok(SENTENCE_PROMPT, return_tensors="pt").input_ids.to(device)
    model = from_pretrained(workdir, device=device, dtype=dtype)
    res = greedy_generate(model, ids, new_tokens)
    out = {"prompt": SENTENCE_PROMPT, "density": density, "compress_s": compress_s, "layouts": _layouts(model),
           "text_dsf": tok.decode(res.ids[0, ids.shape[1]:], skip_special_tokens=True),
           "decode_tok_s": res.decode_tokens_per_s, "cuda_graphs": res.cuda_graphs,
           "report": {k: report.get(k) for k in ("summary", "totals", "mean_relative_error") if k in report}}
    del model
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype).to(device).eval()
    out["text_dense"] = tok.decode(greedy_generate(dense, ids, new_tokens).ids[0, ids.shape[1]:],
                                   skip_special_tokens=True)
    log(f"dense: {out['text_dense']!r}\nDSF  : {out['text_dsf']!r}")
    return out


# ---------------------------------------------------------------------------------------------- results
METHOD = ("greedy decode with a static KV cache, the decode step replayed from one CUDA graph; one warm-up "
          "generation, median of runs; CUDA-event timing; decode_tok_s = batch x steps / decode time (graph replays "
          "only); prefill = one forward of the prompt into a static cache")


DENSE_VARIANTS = ("dense", "dense-compiled")


def _speedup(r: dict, d: dict) -> float | None:
    """How much faster row ``r`` is than the dense row ``d`` (tok/s ratio for decode, time ratio for prefill)."""
    if r["phase"] == "decode":
        return r["decode_tok_s"] / d["decode_tok_s"] if d["decode_tok_s"] else None
    return d["prefill_ms"] / r["prefill_ms"] if r["prefill_ms"] else None


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_dense`` against the faster dense variant of the same model, phase and batch (``baseline_variant``
    names it), ``speedup_vs_dense_eager`` against the eager one, and ``weight_ratio_vs_dense``."""
    dense: dict = {}
    for r in rows:
        if r["variant"] in DENSE_VARIANTS:
            dense.setdefault((r["model"], r["phase"], r["batch"]), []).append(r)
    for r in rows:
        candidates = dense.get((r["model"], r["phase"], r["batch"]))
        if not candidates:
            continue
        best = max(candidates, key=lambda d: _speedup(d, candidates[0]) or 0.0)
        eager = next((d for d in candidates if d["variant"] == "dense"), best)
        r["baseline_variant"] = best["variant"]
        r["speedup_vs_dense"] = _speedup(r, best)
        r["speedup_vs_dense_eager"] = _speedup(r, eager)
        r["weight_ratio_vs_dense"] = r["weight_bytes"] / best["weight_bytes"]


def markdown(results: dict) -> str:
    """A markdown table of the rows."""
    m = results["meta"]
    lines = [f"# End-to-end benchmark on {m['device']} (torch {m['torch']}, triton {m['triton']}, transformers "
             f"{m['transformers']}, {m['date']})", "", *caveat_lines(m),
             "| model | variant | nnz density | phase | batch | tokens | decode tok/s | ms/step | prefill ms | "
             "speedup vs faster dense | weights GiB | weights vs dense | peak GiB | CUDA graphs |", "|" + "---|" * 14]
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in results["rows"]:
        peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['nnz_density']:.3f} | {r['phase']} | {r['batch']} | {r['tokens']} "
            f"| {f(r['decode_tok_s'], '.1f')} | {f(r['decode_step_ms'], '.2f')} | {f(r['prefill_ms'], '.1f')} "
            f"| {f(r.get('speedup_vs_dense'), '.2f')}× | {r['weight_bytes'] / 2**30:.2f} "
            f"| {f(r.get('weight_ratio_vs_dense'), '.3f')} | {f(peak, '.2f')} | {r['cuda_graphs']} |")
    s = results.get("sentence")
    if s and "error" in s:
        lines += ["", f"Real DSF SmolLM2 sentence: failed ({s['error']})"]
    elif s:
        lines += ["", f"Real DSF {s['density']} SmolLM2 (solver, {s['compress_s']:.0f} s), greedy:", "",
                  f"- prompt: {s['prompt']!r}", f"- dense: {s['text_dense']!r}", f"- DSF: {s['text_dsf']!r}"]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    add_ratios(results["rows"])
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))


def merge(paths: list[Path], out: Path) -> dict:
    """Join result files of separate runs (e.g. one per device call): rows and sentence of all, meta of the first
    (with each file's ``date`` listed); writes ``out`` (+ ``.md``)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    results = dict(parts[0], rows=[r for p in parts for r in p["rows"]],
                   sentence=next((p["sentence"] for p in parts if p.get("sentence")), None))
    results["meta"] = dict(parts[0]["meta"], merged_from=[{"file": Path(p).name, "date": q["meta"]["date"]}
                                                          for p, q in zip(paths, parts)])
    write(results, out)
    return results


def bench_e2e(*, out: Path | None = None, models=("llama2-7b", "smollm2"), densities=(0.5, 0.3),
              smollm2_densities=(0.5,), batches=(1, 8), prompt_tokens: int = 64, new_tokens: int = 128,
              prefill_tokens: int = 2048, runs: int = 3, cuda_graphs: bool = True, dry_run: bool = False,
              real_smollm2: bool = False, solver_iters: int | None = None,
              dense_compile: str | None = "max-autotune-no-cudagraphs", log=print) -> dict:
    """Run the sections and return ``{"meta", "rows", "sentence"}``; writes ``out`` (+ ``.md``) after each section.

    ``dry_run``: the tiny model on the CPU in float32 for ``llama2-7b`` and for ``smollm2`` (through the loader),
    2 new tokens, no real compression. ``dense_compile``: the ``torch.compile`` mode of the second dense baseline
    (None: only the eager one).
    """
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench_e2e needs a CUDA GPU; pass dry_run=True (--dry-run) to check it on the CPU")
    dtype = torch.float32 if dry_run else torch.float16
    if dry_run:
        prompt_tokens, new_tokens, prefill_tokens, runs = min(prompt_tokens, 8), min(new_tokens, 3), 16, 1
        dense_compile = dense_compile and "default"  # the CPU's compile of the code path, without autotuning
        log(DRY_RUN_CAVEAT)
    kw = dict(batches=batches, prompt_tokens=prompt_tokens, new_tokens=new_tokens, prefill_tokens=prefill_tokens,
              runs=runs, cuda_graphs=cuda_graphs, log=log)
    results = {"kind": "e2e", "meta": run_meta(device, method=METHOD) | {"dry_run": dry_run}, "rows": [],
               "sentence": None,
               "settings": {k: v for k, v in kw.items() if k != "log"} | {"dtype": str(dtype),
                                                                          "dense_compile": dense_compile}}

    def save() -> None:
        if out is not None:
            write(results, out)

    with tempfile.TemporaryDirectory(prefix="dsf-e2e-") as tmp:
        if "llama2-7b" in models:
            name, shape = ("tiny-llama", TINY_LLAMA) if dry_run else ("llama2-7b", LLAMA2_7B)
            results["rows"] += llama_section(name, shape, device, dtype, densities, dense_compile=dense_compile,
                                             **kw)
            save()
        if "smollm2" in models:
            if dry_run:
                dense, source, name = build_random_llama(TINY_LLAMA, device, dtype, seed=1), None, "tiny-loader"
                source = dense.config.to_dict()
            else:
                from transformers import AutoModelForCausalLM

                from compress.assets import smollm2_dir

                source, name = smollm2_dir(), "smollm2"
                dense = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
            results["rows"] += loader_section(name, dense, source, device, dtype, smollm2_densities, Path(tmp),
                                              dense_compile=dense_compile, **kw)
            del dense
            _free(device)
            save()
        if real_smollm2 and not dry_run:
            try:
                results["sentence"] = real_sentence(device, dtype, Path(tmp) / "smollm2-real", iters=solver_iters,
                                                    log=log)
            except Exception as exc:  # noqa: BLE001 - keep the timing rows; record why the sentence is missing
                results["sentence"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"real SmolLM2 compression failed: {results['sentence']['error']}")
            save()
    add_ratios(results["rows"])
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"),
                    help="JSON output (a .md table is written beside it)")
    ap.add_argument("--models", default="llama2-7b,smollm2", help="comma-separated: llama2-7b, smollm2")
    ap.add_argument("--densities", default="0.5,0.3", help="DSF densities of llama2-7b")
    ap.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="0 skips the prefill rows")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per row (median reported)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (no CUDA graph)")
    ap.add_argument("--real-smollm2", action="store_true", help="also compress SmolLM2 with the DSF solver and "
                    "generate one greedy sentence")
    ap.add_argument("--solver-iters", type=int, default=None, help="DSF iterations for --real-smollm2")
    ap.add_argument("--dense-compile", default="max-autotune-no-cudagraphs", help="torch.compile mode of the second "
                    "dense baseline (e.g. default, max-autotune-no-cudagraphs); none = only the eager baseline")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks code paths; seconds)")
    ap.add_argument("--plot", action="store_true", help="write a PNG beside the JSON (benchmarks/plot.py)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="join these result files into --out "
                    "instead of measuring")
    args = ap.parse_args(argv)
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    if args.merge:
        merge(args.merge, args.out)
    else:
        bench_e2e(out=args.out, models=tuple(args.models.split(",")),
                  densities=tuple(float(v) for v in args.densities.split(",") if v), batches=ints(args.batches),
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
                  runs=args.runs, cuda_graphs=not args.no_cuda_graphs, dry_run=args.dry_run,
                  real_smollm2=args.real_smollm2, solver_iters=args.solver_iters,
                  dense_compile=None if args.dense_compile == "none" else args.dense_compile)
    if args.plot:
        from benchmarks.plot import plot

        print(plot(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
