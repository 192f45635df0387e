"""GPU timing the way the project's numbers are taken: CUDA-graph replays timed with CUDA events.

``graph_time(fns)`` captures ``calls`` invocations (round-robin over ``fns``, e.g. one per weight copy so that
the copies together exceed the L2 cache) in one CUDA graph, replays it ``repeats`` times and returns per-call
microseconds (median, p20, p80). Used by ``tuning`` and by the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["graph_time", "eager_time"]


def _stats(samples: list[float]) -> dict:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"us": pick(0.5), "p20": pick(0.2), "p80": pick(0.8)}


def graph_time(fns: Sequence[Callable[[], object]], *, calls: int = 30, repeats: int = 5) -> dict:
    """Per-call time of ``fns`` (CUDA) under CUDA-graph replay; ``calls`` is raised to ``len(fns)``.

    Every function runs once eagerly first (compiles, allocates), then ``calls`` of them are captured.

    Returns:
        ``{"us", "p20", "p80", "graphed": True}``.
    """
    for f in fns:
        f()
    torch.cuda.synchronize()
    calls = max(calls, len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000.0 / calls)
    del graph
    return dict(_stats(samples), graphed=True)


def eager_time(fns: Sequence[Callable[[], object]], *, calls: int = 30, repeats: int = 5) -> dict:
    """Same measurement without a graph (for ops that cannot be captured); includes launch overhead."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    calls = max(calls, len(fns))
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000.0 / calls)
    return dict(_stats(samples), graphed=False)
