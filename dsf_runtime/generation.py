"""Greedy generation over a static KV cache, with the decode step replayed from one CUDA graph.

``greedy_generate(model, input_ids, max_new_tokens)`` works for any ``transformers`` causal LM whose forward takes
``position_ids``, ``cache`` (older 5.x: ``past_key_values``) and ``logits_to_keep`` (Llama, SmolLM2, ...) with
compressed layers or dense ones:

1. prefill: one eager forward of the prompt into a ``StaticCache`` of ``prompt + max_new_tokens`` positions;
2. one eager decode step (on a side stream; compiles the Triton kernels of this token count, initializes cuBLAS);
3. the decode step is captured once in a CUDA graph whose inputs and outputs are static device tensors: it reads
   the token and position buffers, runs the model, writes the arg-max into the token buffer and the output
   ``tokens[:, step]``, and increments position and step in place; the cache advances its own device-side
   length. Replaying the graph ``max_new_tokens - 2`` times therefore runs the whole decode loop without a host
   sync or a Python-level forward.

With ``compile_mode`` (e.g. ``"max-autotune-no-cudagraphs"``), every forward goes through
``torch.compile(model, mode=compile_mode)`` (compiled once per model and mode, on the first call of each shape;
``greedy_generate``'s eager decode step above is that compile), and the compiled step is captured the same way.

If the capture fails (a model that syncs with the host inside its forward, say), the loop goes on eagerly with the
same step and the reason is logged and returned. On the CPU, or with ``cuda_graphs=False``, the loop is eager.
No early stop at EOS (every sequence generates ``max_new_tokens``; the caller may cut at EOS).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GenerationResult", "greedy_generate", "release_compiled", "time_prefill"]

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What ``greedy_generate`` returns.

    Attributes:
        ids: ``[batch, prompt + new_tokens]`` int64 on the model's device (prompt, then the generated tokens).
        new_tokens: tokens generated per sequence.
        prefill_ms: time of the prompt's forward and its arg-max.
        decode_ms: time of the timed decode steps (the graph replays; all eager steps without graphs).
        decode_steps: number of timed decode steps.
        decode_tokens_per_s: ``batch × decode_steps / decode time`` (0 when no step was timed).
        cuda_graphs: whether the timed steps were CUDA-graph replays.
        graph_error: why the capture failed (None when it was not tried or worked).
    """

    ids: torch.Tensor
    new_tokens: int
    prefill_ms: float
    decode_ms: float
    decode_steps: int
    decode_tokens_per_s: float
    cuda_graphs: bool
    graph_error: str | None = None


class _Timer:
    """Wall time between ``start()`` and ``stop()``: CUDA events on a CUDA device, else ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a, self._b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        """Milliseconds since ``start`` (synchronizes)."""
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b)
        return (time.perf_counter() - self._t) * 1e3


def _static_cache(model: nn.Module, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The name under which ``model_class``'s forward takes the KV cache: ``cache`` (newer transformers 5.x, which
    deprecate the other) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


_COMPILED_ATTR = "_dsf_compiled"  # model.__dict__ entry: {mode: torch.compile(model, mode=mode)}


def _compiled(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model, mode=mode)``, made once per model and mode and kept in the model's ``__dict__`` (not
    as a submodule), so it lives exactly as long as the model; ``release_compiled`` drops it earlier."""
    per_model = model.__dict__.setdefault(_COMPILED_ATTR, {})
    if mode not in per_model:
        per_model[mode] = torch.compile(model, mode=mode)
    return per_model[mode]


def release_compiled(model: nn.Module) -> None:
    """Drop the compiled wrappers ``greedy_generate``/``time_prefill`` made for ``model`` (``compile_mode``)."""
    model.__dict__.pop(_COMPILED_ATTR, None)


def _forward(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache,
             compile_mode: str | None = None) -> torch.Tensor:
    """Logits of the last position, ``[batch, vocab]`` (through ``torch.compile`` with ``compile_mode``)."""
    kwargs = {_cache_argument(type(model)): cache}
    run = model if compile_mode is None else _compiled(model, compile_mode)
    out = run(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1]


def _capture(step: Callable[[], None], device: torch.device) -> tuple[torch.cuda.CUDAGraph | None, str | None]:
    """Run ``step`` once eagerly on a side stream (warm-up, a real step), then capture it; (graph, error)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # noqa: BLE001 - any capture failure: fall back to eager steps, say why
        torch.cuda.synchronize(device)
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("CUDA-graph capture of the decode step failed, decoding eagerly: %s", error)
        return None, error
    return graph, None


@torch.inference_mode()
def greedy_generate(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, cuda_graphs: bool = True,
    on_token: Callable[[], None] | None = None, compile_mode: str | None = None,
) -> GenerationResult:
    """Generate ``max_new_tokens`` tokens greedily after ``input_ids`` (see the module docstring).

    Args:
        model: a causal LM in eval mode on ``input_ids.device`` (compressed layers already converted on CUDA).
        input_ids: ``[batch, prompt]`` int64, no padding (every row has the same length).
        max_new_tokens: ≥ 1.
        cuda_graphs: capture the decode step in a CUDA graph (CUDA only).
        on_token: called after each generated token (e.g. a progress bar); on CUDA it does not synchronize.
        compile_mode: run the forwards through ``torch.compile(model, mode=compile_mode)`` (None: eager).

    Returns:
        A ``GenerationResult``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt] with prompt ≥ 1, got {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    device = input_ids.device
    batch, prompt = input_ids.shape
    cache = _static_cache(model, prompt + max_new_tokens)
    tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    timer = _Timer(device)

    timer.start()
    first = _forward(model, input_ids, torch.arange(prompt, device=device)[None], cache, compile_mode).argmax(-1)
    tokens[:, 0] = first
    prefill_ms = timer.stop()
    notify = on_token or (lambda: None)
    notify()

    ids = first[:, None].clone()  # static decode buffers: current token, its position, where its successor goes
    position = torch.full((1, 1), prompt, dtype=torch.long, device=device)
    step_index = torch.ones(1, dtype=torch.long, device=device)

    def step() -> None:
        nxt = _forward(model, ids, position, cache, compile_mode).argmax(-1)
        ids.copy_(nxt[:, None])
        tokens.index_copy_(1, step_index, nxt[:, None])
        position.add_(1)
        step_index.add_(1)

    steps_left = max_new_tokens - 1
    graph, error = None, None
    if steps_left > 1 and cuda_graphs and device.type == "cuda":  # a graph pays off from the second step
        graph, error = _capture(step, device)  # its warm-up is a real step
        steps_left -= 1
        notify()
    graphed = graph is not None
    run = graph.replay if graphed else step
    decode_ms = 0.0
    if steps_left:
        timer.start()
        for _ in range(steps_left):
            run()
            notify()
        decode_ms = timer.stop()
    del graph
    return GenerationResult(
        ids=torch.cat([input_ids, tokens], dim=1), new_tokens=max_new_tokens, prefill_ms=prefill_ms,
        decode_ms=decode_ms, decode_steps=steps_left,
        decode_tokens_per_s=batch * steps_left / (decode_ms / 1e3) if decode_ms > 0 else 0.0,
        cuda_graphs=graphed, graph_error=error,
    )


@torch.inference_mode()
def time_prefill(model: nn.Module, tokens: int, *, batch: int = 1, runs: int = 3, vocab: int | None = None,
                 seed: int = 0, compile_mode: str | None = None) -> dict:
    """Time the prefill forward of ``batch`` random prompts of ``tokens`` tokens into a static cache (through
    ``torch.compile`` with ``compile_mode``).

    One untimed run first (allocates the cache, compiles), then ``runs`` timed ones (the cache is reset between).

    Returns:
        ``{"ms": median, "runs_ms": [...], "tokens", "batch"}``.
    """
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
    positions = torch.arange(tokens, device=device)[None]
    cache = _static_cache(model, tokens)
    timer = _Timer(device)
    times = []
    for i in range(runs + 1):
        cache.reset()
        timer.start()
        _forward(model, ids, positions, cache, compile_mode).argmax(-1)
        ms = timer.stop()
        if i:
            times.append(ms)
    return {"ms": sorted(times)[len(times) // 2], "runs_ms": times, "tokens": tokens, "batch": batch}
