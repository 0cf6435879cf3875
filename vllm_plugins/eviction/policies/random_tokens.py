"""Uniformly random tokens, drawn independently per layer and KV head: the floor any
scoring policy must beat. Like every policy but expected attention it keeps the prompt's
last tokens (its question, :meth:`~.base.EvictionPolicy.recent_window`); it protects no
sinks."""

from __future__ import annotations

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class RandomPolicy(EvictionPolicy):
    name = "random"
    reads_keys = False  # position and chance decide
    sinks = 0

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        # drawn from the request's (CPU) generator wherever the cache is: the same tokens on any device
        return torch.rand(prompt.num_rows, prompt.num_tokens, generator=prompt.generator).to(prompt.keys.device)
