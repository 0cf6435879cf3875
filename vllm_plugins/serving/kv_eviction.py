"""KV eviction inside vLLM's worker: choose, per layer and KV head, the prompt tokens
that stay, compact them in the paged cache, and let attention skip the freed blocks.

Data flow for a request whose ``extra_args`` carry an eviction plan (set by the
scheduler, :mod:`.block_release`):

    prefill steps: each attention layer's input queries at the prompt's last w positions
        are kept (the policy's proxy / observation window), chunk by chunk
    after the forward pass of the step that completes the prompt (its first generated
        token has seen the whole cache):
        the policy chooses num_kept tokens for every (layer, KV head) from the cached
        keys, in one call, and :func:`~vllm_plugins_kernels.compact_kept_` moves them, in
        order, to the prompt's trailing slots [num_prompt - num_kept, num_prompt)
    the scheduler then frees the leading blocks (:mod:`.block_release`)
    every later step: attention reads the request's block table from its first kept
        block, with seq_len shortened by the skipped tokens; positions (RoPE) and slot
        mapping stay logical, so new tokens continue from the prompt's length.

A request that restarts from position 0 (preempted and recomputed) is evicted again when
its prompt completes again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vllm_plugins.eviction.budget import EvictionPlan
from vllm_plugins.eviction.policies import POLICIES, choose_kept
from vllm_plugins.serving.batch import RequestSlice
from vllm_plugins.serving.paged_cache import paged_key_value
from vllm_plugins_kernels import compact_kept_

PLAN_ARG = "kv_eviction_plan"
"""``extra_args`` key, set by the scheduler: :meth:`EvictionPlan.as_args`."""


def requested_plan(sampling_params) -> EvictionPlan | None:
    args = (getattr(sampling_params, "extra_args", None) or {}).get(PLAN_ARG)
    return EvictionPlan.from_args(args) if args is not None else None


@dataclass
class _Prefill:
    plan: EvictionPlan
    window: int
    queries: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, chunks of (tokens, heads, d)


class KvEvictionHooks:
    """The worker's side of KV eviction, driven by the model runner once per step."""

    KEPT_RECORDS = 256  # the kept tokens of this many recent evictions stay inspectable

    def __init__(self, model: nn.Module, block_size: int, num_heads: int, head_dim: int):
        self.block_size = block_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention = [layer.self_attn.attn for layer in model.model.layers]
        self.prefills: dict[str, _Prefill] = {}
        self.skipped_blocks: dict[str, int] = {}  # evicted requests: leading blocks attention skips
        self.step: list[RequestSlice] = []
        self._narrowed_rows: list[tuple[int, str]] = []
        self.evictions = 0
        self.kept_records: deque[tuple[str, list[torch.Tensor]]] = deque(maxlen=self.KEPT_RECORDS)  # per layer, (kv_heads, kept)
        for index, attn in enumerate(self.attention):
            attn.register_forward_pre_hook(self._query_hook(index))

    # -- per step ---------------------------------------------------------------------
    def begin_step(self, slices: list[RequestSlice], plan_of: Callable[[str], EvictionPlan | None]) -> None:
        """``slices``: every request of the step; ``plan_of``: a request's eviction plan, read
        when it (re)starts."""
        for s in slices:
            if s.restarts:  # new, or preempted and recomputed: evicted again at its prompt's end
                self.skipped_blocks.pop(s.req_id, None)
                self.prefills.pop(s.req_id, None)
                if (plan := plan_of(s.req_id)) is not None:
                    window = POLICIES[plan.policy]().query_window(plan.num_prompt)
                    self.prefills[s.req_id] = _Prefill(plan, window, [[] for _ in self.attention])
        self.step = [s for s in slices if s.req_id in self.prefills]

    def narrow_attention(self, req_ids: list[str], block_table, seq_lens: torch.Tensor, max_seq_lens: torch.Tensor) -> None:
        """Make this step's attention start at each evicted request's first kept block."""
        table = block_table.block_table.gpu
        for row, req_id in enumerate(req_ids):
            skip = self.skipped_blocks.get(req_id)
            if not skip:
                continue
            count = int(block_table.num_blocks_per_row[row])
            table[row, : count - skip] = table[row, skip:count].clone()
            seq_lens[row] -= skip * self.block_size
            max_seq_lens[row] -= skip * self.block_size
            self._narrowed_rows.append((row, req_id))

    def restore_block_table(self, block_table, block_ids_of) -> None:
        table = block_table.block_table.gpu
        for row, req_id in self._narrowed_rows:
            count = int(block_table.num_blocks_per_row[row])
            table[row, :count] = torch.tensor(block_ids_of(req_id)[:count], dtype=table.dtype)
        self._narrowed_rows = []

    def evict_completed(self, block_ids_of) -> None:
        """After the forward pass: evict the requests whose prompt this step completed."""
        for s in self.step:
            if s.completes_prompt:
                self._evict(s.req_id, self.prefills.pop(s.req_id), block_ids_of(s.req_id))
        self.step = []

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.prefills.pop(req_id, None)
            self.skipped_blocks.pop(req_id, None)

    # -- internals --------------------------------------------------------------------
    def _query_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            for s in self.step:
                prefill = self.prefills[s.req_id]
                rows = s.prompt_tail(prefill.window)
                if rows.stop > rows.start:
                    prefill.queries[index].append(args[0][rows].view(-1, self.num_heads, self.head_dim).clone())

        return hook

    def _evict(self, req_id: str, prefill: _Prefill, block_ids: list[int]) -> None:
        plan = prefill.plan
        num_blocks = -(-plan.num_prompt // self.block_size)
        table = torch.tensor(block_ids[:num_blocks], dtype=torch.int64)
        caches = [paged_key_value(attn) for attn in self.attention]
        keys = [key_cache.index_select(0, table).transpose(0, 1).flatten(1, 2)[:, : plan.num_prompt] for key_cache, _ in caches]
        queries = [torch.cat(chunks).transpose(0, 1) for chunks in prefill.queries if chunks]
        kept = choose_kept(plan, keys, queries, self.attention[0].impl.scale)
        for (key_cache, value_cache), keep in zip(caches, kept):
            compact_kept_(key_cache, value_cache, table[None], keep[None].contiguous(), torch.tensor([plan.num_prompt]))
        self.skipped_blocks[req_id] = plan.evicted_blocks(self.block_size)
        self.evictions += 1
        self.kept_records.append((req_id, kept))
