"""GPU time of short pieces of work, replayed as CUDA graphs (so host launch costs do not count)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_time_us(fn: Callable[[], object], reps: int = 20) -> float:
    """Median GPU microseconds of one replay of a CUDA graph that runs ``fn`` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]
