"""SCA, Selective Compression Attention (Findings of EMNLP 2024): keep the most
distinctive cached vectors and drop near-duplicates.

The paper leaves the distance and the greedy rule open; this is farthest-point
(k-center) selection per layer (docs/eviction.md): start from the attention sinks and the
most recent tokens, then repeatedly add the token whose cosine distance to its nearest
kept token is largest. A token's vector is its KV heads' L2-normalised keys side by side,
scaled by 1/sqrt(kv_heads), so the cosine similarity of two tokens is the mean of their
heads' cosine similarities; every KV head of a layer keeps the layer's tokens. The loop
itself is :func:`vllm_plugins.eviction.farthest_points.farthest_points`.
"""

from __future__ import annotations

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


_TINY = 1e-12  # a zero key stays zero rather than dividing by zero


class ScaPolicy(EvictionPolicy):
    name = "sca"
    recent: int = 8

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        n = prompt.num_tokens
        seeds = (list(range(min(self.sinks, n))) + list(range(max(self.sinks, n - self.recent), n)))[:num_kept]
        # imported here: numba adds half a second to the start-up of every process that
        # imports the policies (front end, CLI), most of which never run SCA
        from vllm_plugins.eviction.farthest_points import farthest_points

        kept = farthest_points(layer_vectors(prompt).numpy(), seeds, num_kept)
        return torch.from_numpy(kept).repeat_interleave(prompt.kv_heads, dim=0).to(prompt.keys.device)


def layer_vectors(prompt: CachedPrompt) -> torch.Tensor:
    """(layers, n, kv_heads * head_dim) unit vectors: per layer and token, the KV heads'
    normalised keys side by side, divided by sqrt(kv_heads)."""
    rows, n, head_dim = prompt.keys.shape
    heads = prompt.kv_heads
    keys = prompt.keys.float().cpu().reshape(rows // heads, heads, n, head_dim).transpose(1, 2).contiguous()
    norms = torch.linalg.vector_norm(keys, dim=-1, keepdim=True).mul_(heads**0.5).clamp_min_(_TINY)
    return (keys / norms).view(rows // heads, n, heads * head_dim)
