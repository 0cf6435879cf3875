"""KV eviction policies, one per module, each only choosing the tokens to keep."""

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt
from vllm_plugins.eviction.policies.nacl import NaclPolicy
from vllm_plugins.eviction.policies.random_tokens import RandomPolicy
from vllm_plugins.eviction.policies.sca import ScaPolicy
from vllm_plugins.eviction.policies.snapkv import SnapKVPolicy
from vllm_plugins.eviction.policies.streaming_llm import StreamingLLMPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (NaclPolicy, ScaPolicy, StreamingLLMPolicy, SnapKVPolicy, RandomPolicy)
}

__all__ = ["POLICIES", "EvictionPolicy", "CachedPrompt"]
