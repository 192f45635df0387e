"""Token windows for calibration and evaluation.

A text is tokenized once, without special tokens (no BOS), then cut into windows of ``seqlen`` tokens:

* calibration: ``samples`` windows at random offsets drawn from a seeded generator, like SparseGPT's C4 loader
  (offset ``i`` uniform in ``[0, T - seqlen - 1]``); windows may overlap;
* evaluation: fixed, non-overlapping windows ``[0, seqlen), [seqlen, 2·seqlen), ...``; the tail shorter than
  ``seqlen`` is dropped.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from compress.assets import load_text

__all__ = ["tokenize_text", "calibration_windows", "evaluation_windows", "load_calibration", "load_evaluation"]


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one sequence, no special tokens added.

    Returns:
        ``[T]`` int64.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokens: torch.Tensor, samples: int, seqlen: int, seed: int, *, name: str = "text"
) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens, reproducible for a given ``seed``.

    Args:
        tokens: ``[T]`` token ids.
        samples: number of windows (≥ 1).
        seqlen: tokens per window (≥ 1).
        seed: seed of the private generator that draws the offsets (global RNG state is untouched).
        name: the text's name, used in error messages.

    Returns:
        ``[samples, seqlen]`` int64.

    Raises:
        ValueError: ``samples`` or ``seqlen`` < 1, or the text has fewer than ``seqlen + 1`` tokens.
    """
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    if seqlen < 1:
        raise ValueError(f"seqlen must be ≥ 1, got {seqlen}")
    total = tokens.numel()
    if total < seqlen + 1:
        raise ValueError(
            f"calibration text {name!r} has {total} tokens, fewer than one sample needs "
            f"(seqlen + 1 = {seqlen + 1}); use a smaller seqlen or a longer text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (samples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(tokens: torch.Tensor, seqlen: int, max_windows: int = 0, *, name: str = "text") -> torch.Tensor:
    """The first ``max_windows`` non-overlapping windows of ``seqlen`` tokens (0 = all of them).

    Args:
        tokens: ``[T]`` token ids.
        seqlen: tokens per window (≥ 2: each window predicts ``seqlen - 1`` tokens).
        max_windows: how many windows to keep from the start of the text; 0 keeps all ``T // seqlen``.
        name: the text's name, used in error messages.

    Returns:
        ``[W, seqlen]`` int64 with ``W = min(T // seqlen, max_windows or ∞)``.

    Raises:
        ValueError: ``seqlen`` < 2, ``max_windows`` < 0, or the text is shorter than one window.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be ≥ 2, got {seqlen}")
    if max_windows < 0:
        raise ValueError(f"max_windows must be ≥ 0 (0 = all windows), got {max_windows}")
    count = tokens.numel() // seqlen
    if count == 0:
        raise ValueError(
            f"evaluation text {name!r} has {tokens.numel()} tokens, fewer than one window of seqlen = {seqlen}; "
            "use a smaller seqlen or a longer text"
        )
    if max_windows:
        count = min(count, max_windows)
    return tokens[: count * seqlen].reshape(count, seqlen)


def load_calibration(
    tokenizer: Any, text: str | os.PathLike, samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Calibration windows ``[samples, seqlen]`` from a packaged text name (``emma``, ...) or a UTF-8 file."""
    tokens = tokenize_text(tokenizer, load_text(text))
    return calibration_windows(tokens, samples, seqlen, seed, name=str(text))


def load_evaluation(tokenizer: Any, text: str | os.PathLike, seqlen: int, max_windows: int) -> torch.Tensor:
    """Evaluation windows ``[W, seqlen]`` from a packaged text name (``persuasion``, ...) or a UTF-8 file."""
    tokens = tokenize_text(tokenizer, load_text(text))
    return evaluation_windows(tokens, seqlen, max_windows, name=str(text))
