"""SCA, Selective Compression Attention (Findings of EMNLP 2024): keep the most
distinctive cached vectors and drop near-duplicates.

The paper leaves the distance and the greedy rule open; this is farthest-point
(k-center) selection per layer (docs/eviction.md): start from the attention sinks and the
most recent tokens, then repeatedly add the token whose cosine distance to its nearest
kept token is largest. The similarity of two tokens is the mean of their KV heads'
cosine similarities (keys), and every KV head of a layer keeps the layer's tokens. The loop
itself is :func:`vllm_plugins.eviction.farthest_points.farthest_points`.
"""

from __future__ import annotations

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class ScaPolicy(EvictionPolicy):
    name = "sca"

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        seeds = sorted(self.protected_tokens(prompt.num_tokens)[:num_kept])  # the sinks and recent tokens
        # imported here: numba adds half a second to the start-up of every process that
        # imports the policies (front end, CLI), most of which never run SCA
        from vllm_plugins.eviction.farthest_points import farthest_points

        rows, n, head_dim = prompt.keys.shape
        layer_keys = prompt.keys.float().cpu().reshape(rows // prompt.kv_heads, prompt.kv_heads, n, head_dim)
        kept = farthest_points(layer_keys.numpy(), seeds, num_kept)
        return torch.from_numpy(kept).repeat_interleave(prompt.kv_heads, dim=0).to(prompt.keys.device)
