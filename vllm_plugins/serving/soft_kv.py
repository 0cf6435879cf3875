"""IAPT's soft keys/values in vLLM's paged KV cache.

Each IAPT request needs ``n`` (4) soft key/value tokens per layer for as long as it lives.
They take token slots of whole KV blocks drawn from the scheduler's own block pool, so
vLLM counts them like any other cached token (a full pool makes IAPT requests wait, and
``num_gpu_blocks`` covers them). A block is split into runs of ``n`` slots shared by up to
``block_size // n`` requests, and goes back to the pool when its last run is freed.

The run is reserved when the scheduler first admits the request and released when the
request finishes; a preempted request keeps it (its soft tokens are recomputed in place).
The slot travels to the worker in the request's ``extra_args`` (:data:`SOFT_KV_SLOT_ARG`);
IAPT's served method writes the soft keys/values there at prefill and reads them at every
adapted token through :func:`~.paged_cache.paged_key_value`, a token-major view of the
layer's cache as its attention backend lays it out (CPU, FlashAttention or Triton).
"""

from __future__ import annotations

from dataclasses import dataclass, field


SOFT_KV_SLOT_ARG = "prompt_adapter_soft_kv_slot"
"""``extra_args`` key, set by the scheduler: ``[block_id, first_slot, num_slots]``."""


@dataclass
class _Block:
    block: object  # vllm.v1.core.kv_cache_utils.KVCacheBlock
    width: int
    in_use: int = 0


@dataclass
class SoftTokenSlots:
    """Runs of token slots in KV blocks taken from a vLLM ``BlockPool``."""

    block_pool: object
    block_size: int
    _blocks: dict[int, _Block] = field(default_factory=dict)
    _free_runs: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # width -> (block, slot)

    def allocate(self, width: int) -> list[int] | None:
        """``[block_id, first_slot, width]``, or None when the block pool is empty."""
        if not 1 <= width <= self.block_size:
            raise ValueError(f"{width} soft tokens do not fit a KV block of {self.block_size} tokens")
        runs = self._free_runs.setdefault(width, [])
        if not runs:
            if self.block_pool.get_num_free_blocks() == 0:
                return None
            block = self.block_pool.get_new_blocks(1)[0]
            self._blocks[block.block_id] = _Block(block, width)
            runs.extend((block.block_id, s) for s in reversed(range(0, self.block_size - width + 1, width)))
        block_id, slot = runs.pop()
        self._blocks[block_id].in_use += 1
        return [block_id, slot, width]

    def free(self, run: list[int]) -> None:
        block_id, slot, width = run
        entry = self._blocks[block_id]
        entry.in_use -= 1
        if entry.in_use:
            self._free_runs[width].append((block_id, slot))
            return
        self._free_runs[width] = [r for r in self._free_runs[width] if r[0] != block_id]
        del self._blocks[block_id]
        self.block_pool.free_blocks([entry.block])

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)
