"""KV eviction policies, one per module, each only choosing the tokens to keep."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt
from vllm_plugins.eviction.policies.expected_attention import ExpectedAttentionPolicy
from vllm_plugins.eviction.policies.nacl import NaclPolicy
from vllm_plugins.eviction.policies.random_tokens import RandomPolicy
from vllm_plugins.eviction.policies.sca import ScaPolicy
from vllm_plugins.eviction.policies.snapkv import SnapKVPolicy
from vllm_plugins.eviction.policies.streaming_llm import StreamingLLMPolicy
from vllm_plugins.eviction.query_moments import QueryMoments

if TYPE_CHECKING:  # budget.py imports the policies (their protected tokens), not the reverse
    from vllm_plugins.eviction.budget import EvictionPlan

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (NaclPolicy, ScaPolicy, StreamingLLMPolicy, SnapKVPolicy, ExpectedAttentionPolicy, RandomPolicy)
}


def choose_kept(plan: EvictionPlan, keys: torch.Tensor, queries: torch.Tensor, scale: float, kv_heads: int,
                query_moments: QueryMoments | None = None, value_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(layers * kv_heads, num_kept): the ascending tokens each (layer, KV head) row keeps
    under ``plan``'s policy, chosen for all layers in one call. ``keys``: (layers *
    kv_heads, n, head_dim) as cached, layer-major; ``queries``: (layers * heads, w,
    head_dim), the prompt's last ``w`` rotated queries (``w = query_window(n)``), a layer's
    heads together, ``w = 0`` for a policy that reads none or reads their
    ``query_moments``; ``value_norms``: (layers * kv_heads, n), for a policy that reads
    them (:class:`CachedPrompt`)."""
    prompt = CachedPrompt(keys, queries, scale, plan.generator(), kv_heads, query_moments, value_norms)
    return POLICIES[plan.policy]().select(prompt, plan.num_kept)


__all__ = ["POLICIES", "EvictionPolicy", "CachedPrompt", "QueryMoments", "choose_kept"]
