"""Run an exported causal LM in ONNX Runtime: the graph's input/output names, the first feed, greedy generation.

The exported graph (``exporters.onnx_export``) follows the convention of ONNX Runtime's generation tools
(onnxruntime-genai, optimum), with ``L`` layers, ``H`` key/value heads and head size ``D``:

inputs
    ``input_ids`` [batch, sequence] int64; ``attention_mask`` [batch, past_sequence + sequence] int64 (1 = attend,
    0 = padding); ``position_ids`` [batch, sequence] int64; ``past_key_values.{i}.key`` and
    ``past_key_values.{i}.value`` [batch, H, past_sequence, D] in the model's dtype, for ``i`` in ``0..L-1``
    (``past_sequence`` = 0 on the first call).
outputs
    ``logits`` [batch, sequence, vocab]; ``present.{i}.key`` / ``present.{i}.value``
    [batch, H, past_sequence + sequence, D]: the next call's ``past_key_values.{i}.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATTENTION_MASK",
    "INPUT_IDS",
    "LOGITS",
    "PAST",
    "POSITION_IDS",
    "PRESENT",
    "CacheInput",
    "cache_inputs",
    "greedy_generate_onnx",
    "io_names",
    "position_ids",
    "prefill_feed",
]

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
# Cache input and output names: ``PAST.format(layer=i, kind="key")`` -> ``past_key_values.{i}.key``.
PAST, PRESENT = "past_key_values.{layer}.{kind}", "present.{layer}.{kind}"
_KINDS = ("key", "value")
# ONNX Runtime's type strings of the cache inputs -> numpy dtypes.
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order, for a model of ``layers`` layers."""
    cache = [(i, kind) for i in range(layers) for kind in _KINDS]
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *(PAST.format(layer=i, kind=k) for i, k in cache)]
    return inputs, [LOGITS, *(PRESENT.format(layer=i, kind=k) for i, k in cache)]


@dataclass(frozen=True)
class CacheInput:
    """One ``past_key_values.{i}.{kind}`` input of a session: its name, ``heads`` and ``head_dim`` (the fixed
    dimensions 1 and 3 of [batch, heads, past_sequence, head_dim]) and numpy dtype."""

    name: str
    heads: int
    head_dim: int
    dtype: type[np.generic]


def cache_inputs(session) -> list[CacheInput]:
    """The cache inputs of an ``onnxruntime.InferenceSession`` of an exported model, in graph order.

    Raises:
        ValueError: the session has no ``attention_mask`` input or a cache input of an unexpected shape or type
            (not a model written by ``dsf export --onnx``).
    """
    names = {i.name for i in session.get_inputs()}
    if not {INPUT_IDS, ATTENTION_MASK, POSITION_IDS} <= names:
        raise ValueError(f"the model's inputs are {sorted(names)}; expected {INPUT_IDS}, {ATTENTION_MASK}, "
                         f"{POSITION_IDS} and the KV cache (re-export it with `dsf export --onnx`)")
    found = []
    for inp in session.get_inputs():
        if not inp.name.startswith("past_key_values."):
            continue
        shape = inp.shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])) or inp.type not in _NP_TYPES:
            raise ValueError(f"cache input {inp.name} is {inp.type} {shape}; expected float or float16 "
                             "[batch, heads, past_sequence, head_dim] with fixed heads and head_dim")
        found.append(CacheInput(inp.name, shape[1], shape[3], _NP_TYPES[inp.type]))
    return found


def position_ids(attention_mask: np.ndarray, sequence: int) -> np.ndarray:
    """Positions of the last ``sequence`` tokens: the number of attended tokens before each one (left padding
    skipped), padded positions at 1 as transformers' ``generate`` does.

    Args:
        attention_mask: [batch, past + sequence] int64.
        sequence: tokens of this call.

    Returns:
        [batch, sequence] int64.
    """
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -sequence:].astype(np.int64)


def prefill_feed(session, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The feed of a first call (no past): the prompt, its mask (default all ones), its positions and empty
    caches [batch, heads, 0, head_dim].

    Args:
        session: an ``onnxruntime.InferenceSession`` of an exported model.
        input_ids: [batch, prompt] int64.
        attention_mask: [batch, prompt] int64, 0 at left padding; None = all ones.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, prompt = input_ids.shape
    mask = np.ones((batch, prompt), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask is {list(mask.shape)}, input_ids {list(input_ids.shape)}; they must match")
    feed = {INPUT_IDS: input_ids, ATTENTION_MASK: mask, POSITION_IDS: position_ids(mask, prompt)}
    for c in cache_inputs(session):
        feed[c.name] = np.zeros((batch, c.heads, 0, c.head_dim), c.dtype)
    return feed


def greedy_generate_onnx(
    session, input_ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None
) -> np.ndarray:
    """Greedy generation through an ONNX Runtime session of an exported model: the prompt in one call, then one
    token per call, every ``present.{i}.*`` fed back as ``past_key_values.{i}.*``. No early stop at EOS (as
    ``dsf_runtime.generation.greedy_generate``; the caller may cut there).

    Args:
        session: an ``onnxruntime.InferenceSession`` (``exporters.onnx_ops.make_session`` for ``ai.dsf`` models).
        input_ids: [batch, prompt] int64, prompt ≥ 1; rows shorter than the longest are padded on the left.
        max_new_tokens: ≥ 1.
        attention_mask: [batch, prompt] int64, 0 at the left padding; None = no padding.

    Returns:
        [batch, prompt + max_new_tokens] int64: the prompt, then the generated tokens.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt] with prompt ≥ 1, got {list(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    feed = prefill_feed(session, ids, attention_mask)
    caches = [c.name for c in cache_inputs(session)]
    outputs = [LOGITS, *(name.replace("past_key_values.", "present.", 1) for name in caches)]
    tokens = []
    for step in range(max_new_tokens):
        logits, *presents = session.run(outputs, feed)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        if step + 1 == max_new_tokens:
            break
        mask = np.concatenate([feed[ATTENTION_MASK], np.ones_like(nxt)], axis=1)
        feed = {INPUT_IDS: nxt, ATTENTION_MASK: mask, POSITION_IDS: position_ids(mask, 1), **dict(zip(caches, presents))}
    return np.concatenate([ids, *tokens], axis=1)
