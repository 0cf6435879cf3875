"""StreamingLLM (Xiao et al., arXiv 2309.17453): the first few "attention sink" tokens
plus the most recent ones."""

from __future__ import annotations

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt, protect_edges


class StreamingLLMPolicy(EvictionPolicy):
    name = "streaming_llm"

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        recency = torch.arange(prompt.num_tokens, dtype=torch.float32).expand(prompt.num_rows, -1)
        return protect_edges(recency, self.sinks, 0)
