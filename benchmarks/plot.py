"""Plots from a bench_layer.py JSON (never during timing): speedup over cuBLAS dense vs batch, one panel per shape.

``python benchmarks/plot.py benchmarks/results/layer-h100.json`` writes ``layer-h100.png`` beside the JSON.
Solid lines: our kernels (balanced ``nibble`` layout, fp16), dashed: unstructured ``delta`` layout, dotted:
torch CSR (int32, cuSPARSE) and 2:4 (cuSPARSELt) at density 0.5. The horizontal line is parity with dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["plot"]


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
    fig.suptitle(f"{m.get('device')} — torch {m.get('torch')}, triton {m.get('triton')}, {m.get('date')}")
    fig.tight_layout()
    out = Path(out) if out else Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a bench_layer.py result file")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = ap.parse_args(argv)
    print(plot(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
