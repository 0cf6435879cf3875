"""Uniformly random tokens, drawn independently per layer and KV head: the floor any
scoring policy must beat."""

from __future__ import annotations

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class RandomPolicy(EvictionPolicy):
    name = "random"

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        return torch.rand(prompt.num_rows, prompt.num_tokens, generator=prompt.generator)
