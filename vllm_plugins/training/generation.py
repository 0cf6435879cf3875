"""Greedy generation with a KV cache: one prefill pass, then one pass per token.

The prefill pass carries the pool mask, so a prompt-aware adapter computes its state
there; decode passes carry none and reuse it. Prompts are left-padded and positions
count real tokens only, so a prompt's tokens do not depend on the batch it is in.
Prefill and decoding are separate steps, so that a caller can act on the cache between
them (the KV eviction reference, :mod:`vllm_plugins.eviction.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Prefilled:
    """A batch right after its prefill pass."""

    logits: torch.Tensor  # (batch, vocab): the next token's
    cache: DynamicCache
    attention: torch.Tensor  # (batch, cached tokens): 1 for a real token, 0 for padding
    next_position: torch.Tensor  # (batch, 1)


@torch.no_grad()
def prefill(lm, prompts: list[list[int]], pad_id: int) -> Prefilled:
    if lm is not None and hasattr(lm, "reset_state"):
        lm.reset_state()
    width = max(len(p) for p in prompts)
    batch = len(prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        attention[row, width - len(p) :] = 1
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    adapt = torch.zeros((batch, width), dtype=torch.bool)
    adapt[:, -1] = True
    cache = DynamicCache()
    out = lm(
        ids, attention, pool_mask=attention.bool(), adapt_mask=adapt,
        position_ids=positions, past_key_values=cache, use_cache=True,
    )
    return Prefilled(out.logits[:, -1], cache, attention, positions[:, -1:] + 1)


@torch.no_grad()
def greedy_decode(lm, state: Prefilled, max_new_tokens: int, eos_id: int | None,
                  margins: list[float] | None = None) -> list[list[int]]:
    """Generated token ids per prompt, each ending at (and including) ``<eos>`` if reached
    (``eos_id`` None: never stop early, as vLLM's ``ignore_eos``). ``margins``, if given,
    gets per prompt the smallest gap between the best and the second-best logit over the
    steps that chose its tokens: how far from a tie its greedy path ran (a gap of 1e-5
    can flip with the summation order of another batch or another library)."""
    batch = state.logits.shape[0]
    logits, attention, next_pos = state.logits, state.attention, state.next_position
    generated: list[list[int]] = [[] for _ in range(batch)]
    smallest = [float("inf")] * batch
    done = torch.zeros(batch, dtype=torch.bool)
    decode_adapt = torch.ones((batch, 1), dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        gaps = logits.float().topk(2, dim=-1).values.diff(dim=-1).neg()[:, 0] if margins is not None else None
        for row in range(batch):
            if not done[row]:
                generated[row].append(int(token[row]))
                if gaps is not None:
                    smallest[row] = min(smallest[row], float(gaps[row]))
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        out = lm(
            token.unsqueeze(1), attention, pool_mask=None, adapt_mask=decode_adapt,
            position_ids=next_pos, past_key_values=state.cache, use_cache=True,
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    if margins is not None:
        margins += smallest
    return generated


def greedy_generate(lm, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                    margins: list[float] | None = None) -> list[list[int]]:
    """Generated token ids per prompt, each ending at (and including) ``<eos>`` if reached;
    ``margins`` as in :func:`greedy_decode`."""
    return greedy_decode(lm, prefill(lm, prompts, pad_id), max_new_tokens, eos_id, margins)
