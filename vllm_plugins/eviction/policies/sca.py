"""SCA, Selective Compression Attention (Findings of EMNLP 2024): keep the most
distinctive cached vectors and drop near-duplicates.

The paper leaves the distance and the greedy rule open; this is farthest-point
(k-center) selection on L2-normalised keys, per layer and KV head: start from the attention sinks
and the most recent tokens, then repeatedly add the token whose cosine distance to its
nearest kept token is largest (docs/eviction.md).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class ScaPolicy(EvictionPolicy):
    name = "sca"
    recent: int = 8

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        keys = F.normalize(prompt.keys.float(), dim=-1)  # (rows, n, d)
        n = prompt.num_tokens
        seeds = list(range(min(self.sinks, n))) + list(range(max(self.sinks, n - self.recent), n))
        seeds = seeds[:num_kept]
        distance = 1 - keys @ keys.transpose(1, 2)  # (rows, n, n) cosine distances
        kept = torch.zeros(prompt.num_rows, n, dtype=torch.bool)
        kept[:, seeds] = True
        # nearest[g, j]: distance from token j to the closest kept token of row g; -inf once kept
        nearest = distance[:, :, seeds].amin(dim=2).masked_fill(kept, float("-inf"))
        rows = torch.arange(prompt.num_rows)
        for _ in range(num_kept - len(seeds)):
            pick = nearest.argmax(dim=1)
            torch.minimum(nearest, distance[rows, pick], out=nearest)
            nearest[rows, pick] = float("-inf")
            kept[rows, pick] = True
        return kept.nonzero()[:, 1].view(prompt.num_rows, num_kept)
