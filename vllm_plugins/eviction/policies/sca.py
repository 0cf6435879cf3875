"""SCA, Selective Compression Attention (Findings of EMNLP 2024): keep the most
distinctive cached vectors and drop near-duplicates.

The paper leaves the distance and the greedy rule open; this is farthest-point
(k-center) selection on L2-normalised keys, per layer and KV head: start from the attention sinks
and the most recent tokens, then repeatedly add the token whose cosine distance to its
nearest kept token is largest (docs/eviction.md).

Each step depends on the previous one, so the selection is a loop of ``num_kept`` small
steps. It keeps, per row, each token's similarity to its nearest kept token and updates
it with the one token just added: O(n * head_dim) memory and work per step, where the
full n x n distance matrix would take gigabytes for long prompts. The loop runs in numpy
on the host: its steps are too small for anything but call overhead to matter, and
numpy's is a fraction of torch's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class ScaPolicy(EvictionPolicy):
    name = "sca"
    recent: int = 8

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        keys = F.normalize(prompt.keys.float(), dim=-1).cpu().numpy()  # (rows, n, d)
        rows, n, _ = keys.shape
        seeds = (list(range(min(self.sinks, n))) + list(range(max(self.sinks, n - self.recent), n)))[:num_kept]
        keys_by_dim = np.ascontiguousarray(keys.transpose(0, 2, 1))  # (rows, d, n)
        row = np.arange(rows)
        # closest[g, j]: cosine similarity of token j to its nearest kept token in row g; +inf once kept
        closest = np.matmul(keys[:, seeds], keys_by_dim).max(axis=1)
        closest[:, seeds] = np.inf
        for _ in range(num_kept - len(seeds)):
            pick = closest.argmin(axis=1)
            np.maximum(closest, np.matmul(keys[row, pick][:, None, :], keys_by_dim)[:, 0], out=closest)
            closest[row, pick] = np.inf
        kept = torch.from_numpy(np.isinf(closest)).nonzero()[:, 1].view(rows, num_kept)
        return kept.to(prompt.keys.device)
