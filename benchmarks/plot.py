"""Plots from a benchmark JSON (never during timing), written beside it as .png.

* bench_layer.py results (``python benchmarks/plot.py benchmarks/results/layer-h100.json``): speedup over cuBLAS
  dense vs batch, one panel per shape. Solid lines: our kernels (balanced ``nibble`` layout, fp16), dashed:
  unstructured ``delta`` layout, dotted: torch CSR (int32, cuSPARSE) and 2:4 (cuSPARSELt) at density 0.5. The
  horizontal line is parity with dense.
* bench_e2e.py results (``"kind": "e2e"``): one row of panels per model: weight bytes per variant, decode
  tokens/s per variant and batch, prefill time per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.common import DRY_RUN_CAVEAT

__all__ = ["plot", "plot_e2e"]


def _series(rows):
    """{(shape, label): [(batch, speedup)]} for every curve drawn."""
    out = defaultdict(list)
    for r in rows:
        if r["dtype"] != "float16":
            continue
        shape = tuple(r["shape"])
        label = f"{r['kind']} {r['density']} {r['format']}"
        out[(shape, label)].append((r["batch"], r["dense_us"] / r["ours_us"]))
        if r["density"] == 0.5 and r["format"] == "nibble":
            if r.get("csr_us"):
                out[(shape, f"CSR {r['kind']} 0.5")].append((r["batch"], r["dense_us"] / r["csr_us"]))
            if r.get("semi24_us") and r["kind"] == "single":
                out[(shape, "2:4 single 0.5")].append((r["batch"], r["dense_us"] / r["semi24_us"]))
    return {k: sorted(v) for k, v in out.items()}


def plot(path: Path, out: Path | None = None) -> Path:
    """Draw ``path``'s rows into ``out`` (default: the JSON's name with .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(path).read_text())
    out = Path(out) if out else Path(path).with_suffix(".png")
    if res.get("kind") == "e2e":
        return plot_e2e(res, out)
    series = _series(res["rows"])
    shapes = sorted({k[0] for k in series}, key=lambda s: (-s[0] * s[1], s))
    cols = 4
    rows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    style = {"nibble": "-", "delta": "--"}
    for ax, shape in zip(axes.flat, shapes):
        for (s, label), pts in sorted(series.items()):
            if s != shape:
                continue
            xs, ys = zip(*pts)
            ls = ":" if label.startswith(("CSR", "2:4")) else style.get(label.split()[-1], "-")
            ax.plot(xs, ys, ls, marker="o", ms=3, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{shape[0]}×{shape[1]} (out×in)")
        ax.set_xlabel("batch (tokens)")
        ax.set_ylabel("speedup over cuBLAS dense")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8)
    m = res["meta"]
    fig.suptitle(("" if not m.get("dry_run") else DRY_RUN_CAVEAT + "\n") + f"{m.get('device')} — torch {m.get('torch')}, triton {m.get('triton')}, {m.get('date')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(ax, labels, values, title: str, ylabel: str, fmt: str) -> None:
    bars = ax.bar(range(len(values)), values, color=["0.5" if lab.startswith("dense") else "C0" for lab in labels])
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.bar_label(bars, [format(v, fmt) for v in values], fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)


def plot_e2e(res: dict, out: Path) -> Path:
    """bench_e2e.py results: per model, weight GiB per variant, decode tok/s per variant × batch, prefill ms."""
    import matplotlib.pyplot as plt

    rows = res["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    for axs, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        weights = {r["variant"]: r["weight_bytes"] / 2**30 for r in mine}
        _bars(axs[0], variants, [weights[v] for v in variants], f"{model}: weights", "GiB", ".3g")
        decode = [r for r in mine if r["phase"] == "decode"]
        _bars(axs[1], [f"{r['variant']} b={r['batch']}" for r in decode], [r["decode_tok_s"] for r in decode],
              f"{model}: decode", "tokens/s (batch × steps / s)", ".0f")
        prefill = [r for r in mine if r["phase"] == "prefill"]
        _bars(axs[2], [r["variant"] for r in prefill], [r["prefill_ms"] for r in prefill],
              f"{model}: prefill {prefill[0]['tokens'] if prefill else ''} tokens", "ms", ".1f")
    m = res["meta"]
    fig.suptitle(("" if not m.get("dry_run") else DRY_RUN_CAVEAT + "\n") + f"{m.get('device')} — torch {m.get('torch')}, triton {m.get('triton')}, transformers "
                 f"{m.get('transformers')}, {m.get('date')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a bench_layer.py or bench_e2e.py result file")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = ap.parse_args(argv)
    print(plot(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
