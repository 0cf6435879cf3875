"""Greedy generation with a KV cache: one prefill pass, then one pass per token.

The prefill pass carries the pool mask, so a prompt-aware adapter computes its state
there; decode passes carry none and reuse it. Prompts are left-padded and positions
count real tokens only, so a prompt's tokens do not depend on the batch it is in.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


@torch.no_grad()
def greedy_generate(
    lm, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """Generated token ids per prompt, each ending at (and including) ``<eos>`` if reached."""
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
    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(batch, dtype=torch.bool)
    next_pos = positions[:, -1:] + 1
    decode_adapt = torch.ones((batch, 1), dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        for row in range(batch):
            if not done[row]:
                generated[row].append(int(token[row]))
        done |= token == eos_id
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        out = lm(
            token.unsqueeze(1), attention, pool_mask=None, adapt_mask=decode_adapt,
            position_ids=next_pos, past_key_values=cache, use_cache=True,
        )
        next_pos = next_pos + 1
    return generated
