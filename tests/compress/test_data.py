"""Calibration and evaluation windows: exact counts, contents and seed determinism."""

from __future__ import annotations

import pytest
import torch

from compress.data import (
    calibration_windows,
    evaluation_windows,
    load_calibration,
    load_evaluation,
    tokenize_text,
)


def test_calibration_windows_are_slices_and_deterministic():
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 16, 64, seed=0)
    b = calibration_windows(tokens, 16, 64, seed=0)
    c = calibration_windows(tokens, 16, 64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # each window is a contiguous slice starting in [0, T - seqlen - 1]
    starts = a[:, 0]
    assert torch.equal(a, starts[:, None] + torch.arange(64))
    assert int(starts.max()) <= 1000 - 64 - 1


def test_calibration_windows_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibration_windows(torch.arange(500), 4, 10, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_text_shorter_than_one_sample():
    with pytest.raises(ValueError) as info:
        calibration_windows(torch.arange(64), 4, 64, seed=0, name="tiny.txt")
    assert str(info.value) == (
        "calibration text 'tiny.txt' has 64 tokens, fewer than one sample needs (seqlen + 1 = 65); "
        "use a smaller seqlen or a longer text"
    )
    assert calibration_windows(torch.arange(65), 2, 64, seed=0).shape == (2, 64)


def test_evaluation_windows_exact_counts():
    tokens = torch.arange(10 * 100 + 37)
    all_windows = evaluation_windows(tokens, 100)
    assert all_windows.shape == (10, 100)
    assert torch.equal(all_windows.flatten(), torch.arange(1000))  # non-overlapping, tail dropped
    assert evaluation_windows(tokens, 100, max_windows=3).shape == (3, 100)
    assert evaluation_windows(tokens, 100, max_windows=50).shape == (10, 100)
    with pytest.raises(ValueError, match=r"evaluation text 'x' has 99 tokens, fewer than one window of seqlen = 100"):
        evaluation_windows(torch.arange(99), 100, name="x")


def test_real_texts(tmp_path):
    from transformers import AutoTokenizer

    from compress.assets import load_text, smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokens = tokenize_text(tokenizer, load_text("persuasion"))
    assert tokens.numel() == 115_861
    persuasion = evaluation_windows(tokens, 1024)
    assert persuasion.shape == (113, 1024)
    assert int(persuasion[0, 0]) != tokenizer.bos_token_id  # no BOS added
    assert torch.equal(load_evaluation(tokenizer, "persuasion", 1024, 32), persuasion[:32])
    emma = load_calibration(tokenizer, "emma", 8, 512, 0)
    assert emma.shape == (8, 512)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"calibration text '.*short.txt' has 6 tokens, fewer than one sample"):
        load_calibration(tokenizer, short, 4, 512, 0)
