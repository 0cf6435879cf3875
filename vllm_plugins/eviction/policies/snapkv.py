"""SnapKV (Li et al., arXiv 2404.14469, Sec. 4.2): the prompt's last ``window`` queries
vote for the tokens they attend to; votes are max-pooled over neighbouring tokens
(kernel 7) so that a selected token keeps its context; the window itself is kept
(:meth:`~.base.EvictionPolicy.recent_window`)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt, window_attention


class SnapKVPolicy(EvictionPolicy):
    name = "snapkv"
    sinks = 0  # the window is what SnapKV protects (recent_window)
    window: int = 32
    pool_kernel: int = 7

    def query_window(self, num_tokens: int) -> int:
        return min(self.window, num_tokens)

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        votes = window_attention(prompt)
        return F.max_pool1d(votes[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)[:, 0]
