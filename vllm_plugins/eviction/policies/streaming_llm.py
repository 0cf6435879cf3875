"""StreamingLLM (Xiao et al., arXiv 2309.17453): the first few "attention sink" tokens
plus the most recent ones."""

from __future__ import annotations

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class StreamingLLMPolicy(EvictionPolicy):
    name = "streaming_llm"
    reads_keys = False  # position and chance decide

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        """Recency: besides the protected sinks and recent window, the newest tokens."""
        return torch.arange(prompt.num_tokens, dtype=torch.float32, device=prompt.keys.device).expand(prompt.num_rows, -1)
