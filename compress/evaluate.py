"""Perplexity on fixed windows and the per-layer error report of a compressed model.

Perplexity protocol (the defaults of ``dsf eval`` and the benchmarks):

* the raw, line-wrapped text (default *Persuasion*) is tokenized once without special tokens (no BOS);
* it is cut into non-overlapping windows of ``seqlen`` tokens (default 1024), the tail is dropped, and the first
  ``max_windows`` windows are kept (default 32, about 28% of *Persuasion*'s 113 windows; 0 = all);
* each window is one independent forward pass; every token but the first of a window is predicted;
* perplexity = ``exp(mean NLL over all predicted tokens)``, i.e. ``W · (seqlen - 1)`` tokens.

Numbers are only comparable at equal text, ``seqlen`` and windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_EVAL_TEXT",
    "DEFAULT_EVAL_SEQLEN",
    "DEFAULT_EVAL_WINDOWS",
    "PerplexityResult",
    "perplexity",
    "layer_error_report",
    "layer_error_markdown",
]

DEFAULT_EVAL_TEXT = "persuasion"
DEFAULT_EVAL_SEQLEN = 1024
DEFAULT_EVAL_WINDOWS = 32


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over evaluation windows.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token (nats).
        tokens: predicted tokens, ``windows · (seqlen - 1)``.
        windows: number of windows.
        seqlen: tokens per window.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(
    model: nn.Module, windows: torch.Tensor, *, device: torch.device | str | None = None, progress: bool = True
) -> PerplexityResult:
    """Perplexity of a causal LM over token windows, one window per forward.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``.logits`` ``[1, S, V]``.
        windows: ``[W, S]`` token ids (``compress.data.evaluation_windows``).
        device: where to run the windows; default: the device of the model's first parameter.
        progress: show a progress bar on stderr.
    """
    if device is None:
        device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(device)  # [1, S]
            logits = model(input_ids=ids, use_cache=False).logits  # [1, S, V]
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += ids.shape[1] - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, windows.shape[0], windows.shape[1])


_COLUMNS = ("name", "method", "shape", "nnz", "density", "error", "relative_error", "seconds")


def layer_error_report(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-layer errors and a summary, from a manifest's ``layers`` (or ``compression_report.json``'s).

    Args:
        layers: ``{fqn: {"method", "shape", "nnz", "density", "error", "relative_error", ["seconds"]}}``.

    Returns:
        ``{"layers": [{name, method, shape, nnz, density, error, relative_error, seconds}, ...],
        "summary": {"layers", "total_nnz", "total_params", "density", "mean_relative_error",
        "max_relative_error", "max_relative_error_layer"}}``; missing values are ``None``.
    """
    rows = [{"name": name, **{key: info.get(key) for key in _COLUMNS[1:]}} for name, info in layers.items()]
    total_nnz = sum(int(r["nnz"]) for r in rows if r["nnz"] is not None)
    total_params = sum(int(r["shape"][0]) * int(r["shape"][1]) for r in rows if r["shape"])
    errors = [(r["relative_error"], r["name"]) for r in rows if r["relative_error"] is not None]
    worst = max(errors, key=lambda e: e[0]) if errors else (None, None)
    summary = {
        "layers": len(rows),
        "total_nnz": total_nnz,
        "total_params": total_params,
        "density": total_nnz / total_params if total_params else None,
        "mean_relative_error": sum(e for e, _ in errors) / len(errors) if errors else None,
        "max_relative_error": worst[0],
        "max_relative_error_layer": worst[1],
    }
    return {"layers": rows, "summary": summary}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "shape":
        return "×".join(str(v) for v in value)
    if key in ("error", "relative_error"):
        return f"{value:.4g}"
    if key == "density":
        return f"{value:.4f}"
    if key == "seconds":
        return f"{value:.2f}"
    return str(value)


def layer_error_markdown(report: Mapping[str, Any]) -> str:
    """The report of ``layer_error_report`` as a markdown table plus a summary line."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in report["layers"]:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key in _COLUMNS) + " |")
    s = report["summary"]
    mean = "–" if s["mean_relative_error"] is None else f"{s['mean_relative_error']:.4g}"
    density = "–" if s["density"] is None else f"{s['density']:.4f}"
    lines.append("")
    lines.append(
        f"{s['layers']} layers, {s['total_nnz']:,} non-zeros of {s['total_params']:,} weights "
        f"(density {density}), mean relative error {mean}"
    )
    return "\n".join(lines) + "\n"
