"""Timing GPU work: CUDA-graph replays timed with device events, and the device's copy
bandwidth, the ceiling memory-bound kernels are held against."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], None], replays: int = 50) -> tuple[float, str]:
    """Median time of one call of ``fn`` in milliseconds, and how it was taken.

    ``fn`` is warmed up (compiling its kernels), captured once in a CUDA graph and the graph
    replayed, so launch gaps count as in vLLM's graph-captured decode; work that cannot be
    captured is timed eagerly instead. Each replay is timed with its own pair of events.
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, mode = graph.replay, "cuda-graph"
    except RuntimeError:
        torch.cuda.synchronize()
        run, mode = fn, "eager"
    run()
    return timed_median_ms(run, replays), mode


def timed_median_ms(run: Callable[[], None], replays: int) -> float:
    """Median of ``replays`` calls of ``run`` (a graph's replay, say), each timed with its
    own pair of device events, in milliseconds."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def launched_copy_gbps(bytes_per_launch: int, launches: int) -> float:
    """Bandwidth of ``launches`` graph-replayed copies, each moving ``bytes_per_launch``
    (read plus written) between buffers of its own: the most a memory-bound kernel
    launched that way with that much work per launch can expect."""
    size = max(1, bytes_per_launch // 8)  # float32 elements per buffer
    buffers = [(torch.randn(size, device="cuda"), torch.empty(size, device="cuda")) for _ in range(launches)]

    def copies() -> None:
        for src, dst in buffers:
            dst.copy_(src)

    ms, _ = median_ms(copies)
    return launches * 8 * size / ms / 1e6


def copy_bandwidth_gbps(size_bytes: int = 4 << 30) -> float:
    """Device-to-device copy of ``size_bytes`` (``Tensor.copy_``), counting bytes read and
    written; the faster of a graph-replayed and an eager copy."""
    src = torch.randn(size_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), replays=20)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    eager = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        eager.append(start.elapsed_time(end))
    return 2 * size_bytes / min(ms, statistics.median(eager)) / 1e6
