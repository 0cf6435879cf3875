"""The compaction of kept tokens (:func:`vllm_plugins_kernels.eviction.compact_kept_`,
:func:`~vllm_plugins_kernels.eviction.compact_kept_layers_`) on CPU tensors: one
compiled loop (numba) over the tokens that move, and :func:`run_in_parts`, which spreads
the eviction's compiled loops (the compaction's layers, SCA's) over torch's threads.

The torch reference builds index tensors and moves every kept token through advanced
indexing, twice per cache; on the CPU worker that costs about 0.5 ms per layer for a
1,000-token prompt, and a request is evicted while the whole batch waits. The loop moves
each token that changes place once, with no temporary.

The loops are compiled with ``nogil`` and run on Python threads, the calling thread taking
the first part: no numba threading layer is used. Its OpenMP layer loads the system's
libgomp beside torch's own OpenMP runtime (in a process that also ran a vLLM engine,
torch's CPU attention then started a new thread team for every matrix product); its
workqueue pool leaves the calling thread waiting while its own threads work, and inside
vLLM's step ran the loops no faster than one thread (docs/eviction.md, "Beside kvpress").
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numba
import numpy as np
import torch

_SAME_SIZE_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def compact_kept_cpu(key_cache, value_cache, block_table, keep, seq_lens) -> None:
    compact_kept_layers_cpu([(key_cache, value_cache)], block_table, keep[None], seq_lens)


def compact_kept_layers_cpu(caches, block_table, keep, seq_lens) -> None:
    """Every layer's compaction, the layers spread over torch's threads
    (:func:`run_in_parts`)."""
    keys, values = tuple(_bits(k) for k, _ in caches), tuple(_bits(v) for _, v in caches)
    table, kept, lens = block_table.numpy(), keep.numpy(), seq_lens.numpy()
    run_in_parts(lambda first, stop: _compact_layers(keys, values, table, kept, lens, first, stop), len(caches))


class _Helpers:
    """The threads that run :func:`run_in_parts`'s other parts: one pool, grown to the
    largest count asked for, made again after a fork (a forked child has none of its
    parent's threads). Each helper runs on every core any thread of the process may use:
    a thread inherits its creator's CPU mask, and vLLM may pin the worker's main thread
    to one core (``GOMP_CPU_AFFINITY``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.size = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self.lock = threading.Lock()
        self.pool, self.size = None, 0

    def submit(self, size: int, parts: list[tuple[Callable[[int, int], None], int, int]]) -> list[Future]:
        """Submit ``parts`` (fn, first, stop) to a pool of at least ``size`` threads."""
        with self.lock:
            if self.size < size:
                if self.pool is not None:
                    self.pool.shutdown(wait=False)  # what it holds still runs
                self.pool = ThreadPoolExecutor(size, "vllm-plugins-eviction", initializer=_start_helper)
                self.size = size
            return [self.pool.submit(fn, first, stop) for fn, first, stop in parts]


_HELPERS = _Helpers()
_THIS_THREAD = threading.local()  # .helper: this thread is one of the helpers


def _start_helper() -> None:
    _THIS_THREAD.helper = True
    with contextlib.suppress(OSError):  # Linux only; a thread may end while it is read
        cores = set().union(*(os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")))
        os.sched_setaffinity(0, cores)


def run_in_parts(fn: Callable[[int, int], None], total: int) -> None:
    """``fn(first, stop)`` over contiguous parts of ``range(total)``, one per torch thread
    (``torch.get_num_threads()``, at most ``total``): the calling thread runs the first
    part, helper threads the others, and the call returns when all are done. ``fn``
    must release the GIL (a numba function compiled with ``nogil=True``) for the parts to
    run at once. An exception raised by any part is raised here, once every part has
    ended. Called from a helper (a part that itself splits its work), it runs ``fn``
    over the whole range on that thread.

    Inside vLLM's CPU step the helpers share the cores with torch's OpenMP threads, which
    by default busy-wait for several milliseconds after each parallel region (GNU
    OpenMP); ``GOMP_SPINCOUNT`` bounds that wait (:mod:`vllm_plugins.serving.openmp`)."""
    parts = max(1, min(torch.get_num_threads(), total))
    if parts == 1 or getattr(_THIS_THREAD, "helper", False):
        fn(0, total)
        return
    bounds = [total * i // parts for i in range(parts + 1)]
    others: list[Future] = []
    try:
        others = _HELPERS.submit(parts - 1, [(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)])
        fn(bounds[0], bounds[1])
    finally:
        wait(others)
    for future in others:
        future.result()


def _bits(cache: torch.Tensor) -> np.ndarray:
    """The cache's elements as integers of their size, so any dtype (bfloat16 included,
    which numpy lacks) moves bit for bit; strides are kept."""
    return cache.view(_SAME_SIZE_INTEGER[cache.element_size()]).numpy()


@numba.njit(cache=True, nogil=True)
def _compact_layers(key_caches, value_caches, block_table, keep, seq_lens, first, stop):
    for layer in range(first, stop):
        _compact(key_caches[layer], value_caches[layer], block_table, keep[layer], seq_lens)


@numba.njit(cache=True)
def _compact(key_cache, value_cache, block_table, keep, seq_lens):
    """Kept token i of (request r, KV head h) goes to slot seq_len - num_kept + i. In
    place, in descending i: keep is ascending, so a token moves right or stays, and no
    token is read after its slot has been written (keep[i'] <= dst[i'] < dst[i] for
    i' < i)."""
    block_size, head_dim = key_cache.shape[2], key_cache.shape[3]
    num_kept = keep.shape[2]
    for r in range(keep.shape[0]):
        first_dst = seq_lens[r] - num_kept
        for h in range(keep.shape[1]):
            for i in range(num_kept - 1, -1, -1):
                src, dst = keep[r, h, i], first_dst + i
                if src == dst:
                    continue
                src_block, src_slot = block_table[r, src // block_size], src % block_size
                dst_block, dst_slot = block_table[r, dst // block_size], dst % block_size
                for d in range(head_dim):
                    key_cache[dst_block, h, dst_slot, d] = key_cache[src_block, h, src_slot, d]
                    value_cache[dst_block, h, dst_slot, d] = value_cache[src_block, h, src_slot, d]
