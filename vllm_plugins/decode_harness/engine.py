"""Requests through the harness: prefill and decode steps, each prepared as vLLM's model
runner with the plugins' runner mixin prepares it.

Before a step's forward pass the engine writes the step's token ids, positions and block
tables (:class:`~.attention.StepInputs`), each token's LoRA slot (:class:`~.lora.LoraMapping`)
and hands the plugins' runtime the step's :class:`~vllm_plugins.serving.batch.StepBatch`
and the ``extra_args`` of its prompt-aware requests
(:meth:`~vllm_plugins.serving.prompt_aware.PromptAwareRuntime.begin_step`); after it,
the runtime clears the step's map (``end_step``). The forward pass itself reads buffers
only, so :meth:`HarnessEngine.decode_logits` can be captured once and replayed for any
batch of as many requests, whatever adapters they name.

KV blocks come from a :class:`BlockPool`; IAPT's soft tokens take runs of slots in blocks
of that pool through the serving scheduler's own allocator
(:class:`~vllm_plugins.serving.soft_kv.SoftTokenSlots`), outside the requests' block
tables, as in serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_plugins.decode_harness.attention import StepInputs
from vllm_plugins.decode_harness.lora import LoraMapping
from vllm_plugins.decode_harness.model import LlamaStack
from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG, StepBatch
from vllm_plugins.serving.prompt_aware import PromptAwareRuntime
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG, SoftTokenSlots


@dataclass(frozen=True)
class Block:
    block_id: int


class BlockPool:
    """KV blocks 0 .. num_blocks - 1; the part of vLLM's ``BlockPool`` the soft-token
    allocator uses."""

    def __init__(self, num_blocks: int):
        self._free = [Block(i) for i in reversed(range(num_blocks))]

    def get_num_free_blocks(self) -> int:
        return len(self._free)

    def get_new_blocks(self, count: int) -> list[Block]:
        if count > len(self._free):
            raise RuntimeError(f"{count} KV blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free_blocks(self, blocks: list[Block]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class Request:
    """``adapter``: a prompt-aware adapter's (name, path); ``soft_tokens``: IAPT's soft
    tokens per layer (0: none); ``lora_slot``: its stock LoRA's slot (-1: none)."""

    req_id: str
    prompt: list[int]
    adapter: tuple[str, str] | None = None
    soft_tokens: int = 0
    lora_slot: int = -1
    generated: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    soft_run: list[int] | None = None

    @property
    def length(self) -> int:
        """Tokens whose keys/values are cached once the last generated token is computed."""
        return len(self.prompt) + len(self.generated)


class HarnessEngine:
    def __init__(self, model: LlamaStack, runtime: PromptAwareRuntime, lora: LoraMapping | None, num_blocks: int):
        self.model = model
        self.inputs: StepInputs = model.inputs
        self.runtime = runtime
        self.lora = lora
        self.block_size = self.inputs.block_size
        self.pool = BlockPool(num_blocks)
        self.soft_slots = SoftTokenSlots(self.pool, self.block_size)

    # -- requests -----------------------------------------------------------------------
    def admit(self, requests: list[Request], max_length: int) -> None:
        """KV blocks for ``max_length`` tokens per request, and IAPT's soft-token runs."""
        blocks = -(-max_length // self.block_size)
        if blocks > self.inputs.block_tables.shape[1]:
            raise ValueError(f"{max_length} tokens take {blocks} blocks; the step's tables hold {self.inputs.block_tables.shape[1]}")
        for request in requests:
            request.blocks = self.pool.get_new_blocks(blocks)
            if request.soft_tokens:
                request.soft_run = self.soft_slots.allocate(request.soft_tokens)
                if request.soft_run is None:
                    raise RuntimeError("no free KV block for IAPT's soft tokens")

    def release(self, requests: list[Request]) -> None:
        for request in requests:
            self.pool.free_blocks(request.blocks)
            if request.soft_run is not None:
                self.soft_slots.free(request.soft_run)
            request.blocks, request.soft_run = [], None
        self.runtime.release([r.req_id for r in requests])

    # -- steps --------------------------------------------------------------------------
    def prefill(self, requests: list[Request], max_tokens: int) -> None:
        """Each request's whole prompt, as many prompts per step as fit ``max_tokens``;
        each gets its first generated token (greedy)."""
        chunk: list[Request] = []
        for request in requests:
            if chunk and sum(len(r.prompt) for r in chunk) + len(request.prompt) > max_tokens:
                self._prefill_step(chunk)
                chunk = []
            chunk.append(request)
        if chunk:
            self._prefill_step(chunk)

    def _prefill_step(self, requests: list[Request]) -> None:
        lengths = [len(r.prompt) for r in requests]
        self._begin(requests, [r.prompt for r in requests], [0] * len(requests))
        try:
            hidden = self.model(sum(lengths))
            last = torch.tensor(np.cumsum(lengths) - 1, device=hidden.device)
            tokens = self.model.logits(hidden[last]).argmax(-1).tolist()
        finally:
            self.runtime.end_step()
        for request, token in zip(requests, tokens):
            request.generated.append(token)

    def begin_decode(self, requests: list[Request]) -> None:
        """Prepare the step that computes each request's last generated token."""
        self._begin(requests, [r.generated[-1:] for r in requests], [r.length - 1 for r in requests])

    def decode_logits(self, num_tokens: int) -> torch.Tensor:
        """The decode step's forward pass: (tokens, vocab) float32 logits. Reads buffers only."""
        return self.model.logits(self.model(num_tokens))

    def end_step(self) -> None:
        self.runtime.end_step()

    def decode(self, requests: list[Request]) -> None:
        """One eager decode step; each request gets its next token (greedy)."""
        self.begin_decode(requests)
        try:
            tokens = self.decode_logits(len(requests)).argmax(-1).tolist()
        finally:
            self.end_step()
        for request, token in zip(requests, tokens):
            request.generated.append(token)

    def _begin(self, requests: list[Request], token_ids: list[list[int]], first_positions: list[int]) -> None:
        scheduled = np.array([len(t) for t in token_ids], dtype=np.int64)
        computed = np.array(first_positions, dtype=np.int64)
        batch = StepBatch([r.req_id for r in requests], scheduled, computed,
                          np.array([len(r.prompt) for r in requests], dtype=np.int64))
        width = self.inputs.block_tables.shape[1]
        tables = torch.zeros(len(requests), width, dtype=torch.int64)
        for row, request in enumerate(requests):
            tables[row, : len(request.blocks)] = torch.tensor([b.block_id for b in request.blocks])
        rows = torch.from_numpy(batch.token_row)
        self.inputs.write(torch.tensor([t for ids in token_ids for t in ids]), torch.from_numpy(batch.positions),
                          tables[rows])
        args = {r.req_id: self._adapter_args(r) for r in requests if r.adapter is not None}
        self.runtime.begin_step(batch, args)
        if self.lora is not None:
            self.lora.update(np.array([r.lora_slot for r in requests], dtype=np.int64)[batch.token_row])

    @staticmethod
    def _adapter_args(request: Request) -> dict:
        """The ``extra_args`` the front end and scheduler give a prompt-aware request."""
        args = {ADAPTER_ARG: request.adapter[0], ADAPTER_PATH_ARG: request.adapter[1]}
        if request.soft_run is not None:
            args[SOFT_KV_SLOT_ARG] = list(request.soft_run)
        return args


def greedy_tokens(engine: HarnessEngine, requests: list[Request], max_new_tokens: int, max_tokens: int) -> list[list[int]]:
    """``max_new_tokens`` greedy tokens per request (no end-of-sequence stop), all requests
    in every step; their blocks are freed after."""
    engine.admit(requests, max(len(r.prompt) for r in requests) + max_new_tokens)
    try:
        engine.prefill(requests, max_tokens)
        for _ in range(max_new_tokens - 1):
            engine.decode(requests)
    finally:
        engine.release(requests)
    return [r.generated for r in requests]
