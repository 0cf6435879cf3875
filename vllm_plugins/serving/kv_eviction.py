"""KV eviction inside vLLM's worker: capture the prompt's queries the policy reads, choose per layer
and KV head the prompt tokens that stay, compact them in the paged cache, and narrow
attention to the kept blocks.

Data flow for a request whose ``extra_args`` carry an eviction plan (set by the
scheduler, :mod:`.block_release`):

    runner, before each prefill step (:meth:`KvEviction.begin_step`): the flat tokens at
        the prompt's last w positions (the policy's proxy / observation window; for
        expected attention, every position after the sinks) are listed
        in ``capture_tokens`` (on the model's device), their number in ``num_capture`` (on
        the host)
    forward pass: the host-driven ``kv_eviction_capture`` op (:mod:`.ops`) copies each
        layer's queries of those tokens into ``captured``, in the list's order
        (:meth:`capture`)
    runner, after the forward pass (:meth:`end_step`): the step's capture rows, and the
        blocks of each request whose prompt the step completed (its first generated
        token has seen the whole cache), are set aside; the step samples and returns
    runner, at the start of the next step, before vLLM updates its states (which may
        zero or copy newly allocated blocks) and before its forward pass
        (:meth:`finish_last_step`): requests that finished or were preempted since are
        dropped; the set-aside queries go into their request's query window (for expected
        attention, into their running moments in the future frame,
        :mod:`vllm_plugins.eviction.query_moments`); for a completed prompt the policy
        chooses num_kept tokens for every (layer, KV head) from the cached keys in one
        call, and :func:`~vllm_plugins_kernels.compact_kept_layers_` moves them, in order,
        to the prompt's trailing slots [num_prompt - num_kept, num_prompt)
    the scheduler frees the leading blocks once the completing step has run
        (:mod:`.block_release`); another request may get them in the next step, and
        nothing writes them before the head of that step, where the compaction reads them
    every later step, where vLLM builds the attention metadata (:meth:`narrow`):
        attention reads the request's block table from its first kept block, with
        seq_len shortened by the skipped tokens; positions (RoPE) and the slot mapping
        stay logical, so new tokens continue from the prompt's length.

A request that restarts from position 0 (preempted and recomputed) is evicted again when
its prompt completes again; one that finished or was preempted before the next step is
not evicted at all (its blocks are gone).

Why the next step: the first token needs the whole cache, not the eviction, so the step
that completes a prompt returns its token (the request's time to first token) without
waiting for the policy's choice; the choice and the compaction run before anything reads
the kept cache, at the head of the next step, which every request in that step waits for
(docs/eviction.md, "Where the eviction runs").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from vllm_plugins.eviction.budget import EvictionPlan
from vllm_plugins.eviction.policies import POLICIES, choose_kept
from vllm_plugins.eviction.query_moments import FutureFrame, QueryMoments, RopeTable
from vllm_plugins.serving.batch import StepBatch
from vllm_plugins.serving.methods import LayerModules
from vllm_plugins_kernels import compact_kept_layers_

FOLD_ELEMENTS = 1 << 24
"""Query elements folded into expected attention's moments at once (as many layers of a
prefill chunk as fit, at least one): a few float32 copies of 64 MB at most."""

PLAN_ARG = "kv_eviction_plan"
"""``extra_args`` key, set by the scheduler: :meth:`EvictionPlan.as_args`."""


def requested_plan(sampling_params) -> EvictionPlan | None:
    args = (getattr(sampling_params, "extra_args", None) or {}).get(PLAN_ARG)
    return EvictionPlan.from_args(args) if args is not None else None


class _SetAside(NamedTuple):
    """A request's part of a step, kept from its forward pass to the head of the next step:
    its rows ``[first, first + count)`` of ``captured``, at ``offset`` in its query window,
    and the prompt's block ids in order if the step completed the prompt (else None)."""

    req_id: str
    first: int
    count: int
    offset: int
    prompt_blocks: list[int] | None


@dataclass
class _Prefill:
    """An evicting request until its prompt completes: the queries of its prompt's last
    ``window`` tokens, as they are computed, fill ``queries`` (layers, heads, window,
    head_dim), or, for a policy that reads them so, are folded into ``moments`` (layers *
    heads query heads)."""

    plan: EvictionPlan
    window: int
    queries: torch.Tensor | None = None
    moments: QueryMoments | None = None


class KvEviction:
    """The worker's side of KV eviction, driven by the model runner once per step."""

    KEPT_RECORDS = 256  # the kept tokens of this many recent evictions stay inspectable

    def __init__(self, layers: list[LayerModules], scale: float, rope: RopeTable, block_size: int,
                 num_heads: int, head_dim: int, max_tokens: int, max_reqs: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        """``layers``: the decoder layers, whose attention caches are compacted; ``scale``:
        the attention's softmax scale, which the policies score with; ``rope``: the
        model's RoPE, which brings captured queries into the future frame (expected
        attention). Buffers the forward pass reads or writes live on
        ``device`` (the model's); the narrowing of attention metadata is decided on the
        host."""
        self.layers = layers
        self.scale = scale
        self.rope = rope.to(device)
        self.block_size = block_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.device = torch.device(device)
        self.capture_tokens = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # the step's tokens whose queries are kept
        self.num_capture = 0  # how many of capture_tokens are listed
        self.captured = torch.zeros(len(layers), max_tokens, num_heads * head_dim, dtype=dtype, device=device)
        self.skipped_rows = torch.zeros(max_reqs, dtype=torch.int64)  # per batch row: leading blocks attention skips
        self.narrowing = False  # some row of the step skips blocks
        self.prefills: dict[str, _Prefill] = {}
        self.skipped_blocks: dict[str, int] = {}  # evicted requests: leading blocks attention skips
        self._step: list[tuple[str, int, int, int, bool]] = []  # (req, first capture row, count, window offset, completes)
        self._set_aside: list[_SetAside] = []  # the last step's, for finish_last_step
        self.evictions = 0
        self.kept_records: deque[tuple[str, list[torch.Tensor]]] = deque(maxlen=self.KEPT_RECORDS)  # per layer, (kv_heads, kept)

    # -- runner side, outside the forward pass ------------------------------------------
    def begin_step(self, batch: StepBatch, plan_of: Callable[[str], EvictionPlan | None]) -> None:
        """Fill the step's capture rows and attention narrowing; ``plan_of``: a request's
        eviction plan, read when it (re)starts."""
        self.clear()
        restarts, completes = batch.restarts, batch.completes_prompt
        spans: list[np.ndarray] = []  # per evicting row, its flat tokens to capture
        num_capture = 0
        for row, req_id in enumerate(batch.req_ids):
            if restarts[row]:  # new, or preempted and recomputed: evicted again at its prompt's end
                self.skipped_blocks.pop(req_id, None)
                self.prefills.pop(req_id, None)
                if (plan := plan_of(req_id)) is not None:
                    self.prefills[req_id] = self._start_prefill(plan)
            self.skipped_rows[row] = self.skipped_blocks.get(req_id, 0)
            if req_id not in self.prefills:
                continue
            first, count, offset = batch.prompt_tail(row, self.prefills[req_id].window)
            self._step.append((req_id, num_capture, count, offset, bool(completes[row])))
            spans.append(np.arange(first, first + count, dtype=np.int64))
            num_capture += count
        if num_capture:
            self.capture_tokens[:num_capture] = torch.from_numpy(np.concatenate(spans))
        self.num_capture = num_capture
        self.narrowing = bool(self.skipped_rows[: len(batch.req_ids)].any())

    def end_step(self, block_ids_of: Callable[[str], list[int]]) -> None:
        """After the forward pass: set aside the step's captured queries, and the prompt's
        block ids of each request whose prompt the step completed, for
        :meth:`finish_last_step` (``captured`` keeps them until the next forward pass)."""
        self._set_aside = []
        for req_id, first, count, offset, completes in self._step:
            num_blocks = -(-self.prefills[req_id].plan.num_prompt // self.block_size)
            prompt_blocks = block_ids_of(req_id)[:num_blocks] if completes else None
            self._set_aside.append(_SetAside(req_id, first, count, offset, prompt_blocks))
        self.clear()

    def finish_last_step(self, gone: set[str]) -> None:
        """At the head of the next step, before vLLM updates its states and before the
        forward pass: forget the requests in ``gone`` (finished or preempted since), keep
        the others' set-aside queries, and evict the prompts the last step completed."""
        for req_id in gone:
            self.prefills.pop(req_id, None)
            self.skipped_blocks.pop(req_id, None)
        set_aside, self._set_aside = self._set_aside, []
        for req_id, first, count, offset, prompt_blocks in set_aside:
            prefill = self.prefills.get(req_id)
            if prefill is None:  # gone
                continue
            queries = self.captured[:, first : first + count].view(len(self.layers), count, self.num_heads, self.head_dim)
            if prefill.moments is not None:
                start = prefill.plan.num_prompt - prefill.window + offset
                frame = FutureFrame(self.rope, torch.arange(start, start + count, device=self.device), prefill.plan.num_prompt)
                per_fold = max(1, FOLD_ELEMENTS // queries[0].numel())  # layers: bounds the fold's float32 copies
                for low in range(0, len(self.layers), per_fold):
                    layers = slice(low, low + per_fold)
                    heads = slice(low * self.num_heads, (low + per_fold) * self.num_heads)
                    prefill.moments.add(frame(queries[layers].transpose(1, 2)).flatten(0, 1), heads)
            else:
                prefill.queries[:, :, offset : offset + count] = queries.transpose(1, 2)
            if prompt_blocks is not None:
                self._evict(req_id, self.prefills.pop(req_id), prompt_blocks)

    def clear(self) -> None:
        """No token to capture and no narrowing: what the op and the metadata builders see
        outside a step (profiling, warm-up)."""
        self.num_capture = 0
        self.skipped_rows.zero_()
        self.narrowing = False
        self._step = []

    def narrow(self, num_reqs: int, block_table: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's attention inputs with each evicted request's block table (num_reqs,
        max blocks) starting at its first kept block and its seq_len (num_reqs,) shortened
        by the skipped tokens, as new tensors on their devices; None when no request of
        the step skips blocks (:func:`~.vllm_internals.rewrite_attention_metadata` applies
        it to vLLM's metadata)."""
        skip = self.skipped_rows[:num_reqs]
        if not bool(skip.any()):
            return None
        columns = (torch.arange(block_table.shape[1]) + skip[:, None]).clamp(max=block_table.shape[1] - 1)
        narrowed_lens = seq_lens - (skip * self.block_size).to(seq_lens.device, seq_lens.dtype)
        return block_table.gather(1, columns.to(block_table.device)), narrowed_lens

    # -- op side, inside the forward pass -----------------------------------------------
    def capture(self, layer: int, query: torch.Tensor) -> None:
        """Copy layer ``layer``'s queries (tokens, heads * head_dim) of the step's capture
        tokens into the leading rows of ``captured``, in ``capture_tokens``' order."""
        count = self.num_capture
        if count:
            torch.index_select(query, 0, self.capture_tokens[:count], out=self.captured[layer, :count])

    # -- internals ----------------------------------------------------------------------
    def _start_prefill(self, plan: EvictionPlan) -> _Prefill:
        policy = POLICIES[plan.policy]
        window = policy().query_window(plan.num_prompt)
        if policy.queries_as_moments:
            return _Prefill(plan, window, moments=QueryMoments.empty(len(self.layers) * self.num_heads, self.head_dim,
                                                                     self.device))
        shape = (len(self.layers), self.num_heads, window, self.head_dim)
        return _Prefill(plan, window, queries=torch.empty(shape, dtype=self.captured.dtype, device=self.device))

    def _evict(self, req_id: str, prefill: _Prefill, prompt_blocks: list[int]) -> None:
        plan = prefill.plan
        table = torch.tensor(prompt_blocks, dtype=torch.int64, device=self.device)
        caches = [layer.key_value() for layer in self.layers]
        kv_heads = caches[0][0].shape[1]
        policy = POLICIES[plan.policy]
        if policy.reads_keys:
            keys = self._gather_keys([key for key, _ in caches], table, plan.num_prompt)
        else:
            keys = torch.empty(len(caches) * kv_heads, plan.num_prompt, 0, dtype=caches[0][0].dtype, device=self.device)
        norms = None
        if policy.reads_value_norms:
            norms = self._value_norms([value for _, value in caches], table, plan.num_prompt)
        queries = keys.new_empty(0, 0, self.head_dim) if prefill.queries is None else prefill.queries.flatten(0, 1)
        kept = choose_kept(plan, keys, queries, self.scale, kv_heads, prefill.moments, norms)
        kept = kept.view(len(caches), kv_heads, plan.num_kept)
        compact_kept_layers_(caches, table[None], kept[:, None], torch.tensor([plan.num_prompt], device=self.device))
        self.skipped_blocks[req_id] = plan.evicted_blocks(self.block_size)
        self.evictions += 1
        self.kept_records.append((req_id, list(kept)))

    def _value_norms(self, caches: list[torch.Tensor], table: torch.Tensor, num_prompt: int) -> torch.Tensor:
        """(layers * kv_heads, num_prompt) float32: the L2 norms of the prompt's cached
        values, taken from each layer's selected blocks (no layer-major copy of the values
        is made)."""
        norms = torch.stack([torch.linalg.vector_norm(cache.index_select(0, table), dim=-1, dtype=torch.float32)
                             for cache in caches])  # (layers, blocks, kv_heads, block_size)
        return norms.transpose(1, 2).reshape(len(caches) * caches[0].shape[1], -1)[:, :num_prompt]

    def _gather_keys(self, caches: list[torch.Tensor], table: torch.Tensor, num_prompt: int) -> torch.Tensor:
        """(layers * kv_heads, num_prompt, head_dim): the prompt's cached keys of every
        layer, from the blocks in ``table``, gathered once into one layer-major tensor."""
        kv_heads = caches[0].shape[1]
        gathered = torch.empty(len(caches), kv_heads, len(table), self.block_size, self.head_dim, dtype=caches[0].dtype,
                               device=self.device)
        for layer, cache in enumerate(caches):
            gathered[layer].copy_(cache.index_select(0, table).transpose(0, 1))
        return gathered.view(len(caches) * kv_heads, len(table) * self.block_size, self.head_dim)[:, :num_prompt]
