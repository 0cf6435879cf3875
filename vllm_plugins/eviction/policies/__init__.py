"""KV eviction policies, one per module, each only choosing the tokens to keep."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt
from vllm_plugins.eviction.policies.nacl import NaclPolicy
from vllm_plugins.eviction.policies.random_tokens import RandomPolicy
from vllm_plugins.eviction.policies.sca import ScaPolicy
from vllm_plugins.eviction.policies.snapkv import SnapKVPolicy
from vllm_plugins.eviction.policies.streaming_llm import StreamingLLMPolicy

if TYPE_CHECKING:  # budget.py imports the policies (their protected tokens), not the reverse
    from vllm_plugins.eviction.budget import EvictionPlan

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (NaclPolicy, ScaPolicy, StreamingLLMPolicy, SnapKVPolicy, RandomPolicy)
}


def choose_kept(plan: EvictionPlan, keys: list[torch.Tensor], queries: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """Per layer, the (kv_heads, num_kept) ascending tokens that ``plan``'s policy keeps,
    chosen for all layers in one call. ``keys``: per layer, (kv_heads, n, head_dim) as
    cached; ``queries``: per layer, (heads, w, head_dim), the prompt's last ``w`` rotated
    queries (``w = query_window(n)``), or no layers for a policy that reads none."""
    all_keys = torch.cat(keys)
    window = torch.cat(queries) if queries else all_keys.new_empty(0, 0, all_keys.shape[-1])
    prompt = CachedPrompt(all_keys, window, scale, plan.generator(), kv_heads=keys[0].shape[0])
    return list(POLICIES[plan.policy]().select(prompt, plan.num_kept).chunk(len(keys)))


__all__ = ["POLICIES", "EvictionPolicy", "CachedPrompt", "choose_kept"]
