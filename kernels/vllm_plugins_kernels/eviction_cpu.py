"""The compaction of kept tokens (:func:`vllm_plugins_kernels.eviction.compact_kept_`,
:func:`~vllm_plugins_kernels.eviction.compact_kept_layers_`) on CPU tensors: one
compiled loop (numba) over the tokens that move.

The torch reference builds index tensors and moves every kept token through advanced
indexing, twice per cache; on the CPU worker that costs about 0.5 ms per layer for a
1,000-token prompt, and a request is evicted while the whole batch waits. The loop moves
each token that changes place once, with no temporary.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

_SAME_SIZE_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# numba's parallel loops (here and in SCA's farthest points) run on numba's own thread pool
# ("workqueue") unless the user chose a threading layer (NUMBA_THREADING_LAYER). Its default
# choice on this platform is OpenMP through the system's libgomp, a second OpenMP runtime
# beside torch's: in a process that also ran a vLLM engine, torch's CPU attention then
# started a new thread team for every matrix product inside its parallel loops (thousands
# of thread creations a second; a 4 s transformers training run took 150 s afterwards), and
# GNU OpenMP aborts a forked child that re-enters it (vLLM forks its engine core; it runs its own
# numba code on workqueue for that reason).
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"


def compact_kept_cpu(key_cache, value_cache, block_table, keep, seq_lens) -> None:
    compact_kept_layers_cpu([(key_cache, value_cache)], block_table, keep[None], seq_lens)


def compact_kept_layers_cpu(caches, block_table, keep, seq_lens) -> None:
    """Every layer's compaction in one compiled call, a parallel loop over the layers on
    numba's threads (as many as torch has; inside vLLM's step the workqueue pool runs them
    about as fast as one thread: docs/eviction.md)."""
    use_torch_threads()
    keys, values = tuple(_bits(k) for k, _ in caches), tuple(_bits(v) for _, v in caches)
    _compact_layers(keys, values, block_table.numpy(), keep.numpy(), seq_lens.numpy())


def use_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch has (vLLM 0.32's CPU worker
    leaves torch's count as it found it: it makes ``torch.set_num_threads`` a no-op before
    ``set_torch_threads_for_runtime`` calls it)."""
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _bits(cache: torch.Tensor) -> np.ndarray:
    """The cache's elements as integers of their size, so any dtype (bfloat16 included,
    which numpy lacks) moves bit for bit; strides are kept."""
    return cache.view(_SAME_SIZE_INTEGER[cache.element_size()]).numpy()


@numba.njit(cache=True, parallel=True)
def _compact_layers(key_caches, value_caches, block_table, keep, seq_lens):
    for layer in numba.prange(len(key_caches)):
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
