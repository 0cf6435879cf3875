"""SnapKV (Li et al., arXiv 2404.14469, Sec. 4.2-4.3): the prompt's last ``window``
queries vote for the tokens they attend to (softmax over the prompt, summed over the
window and over the query heads of a KV group: kvpress averages, the same order); votes are average-pooled over
neighbouring tokens (kernel 5) so that a selected token keeps its context; the window
itself is kept (:meth:`~.base.EvictionPolicy.recent_window`).

Window 64 and average pooling of kernel 5 are the defaults of the authors' code and of
NVIDIA kvpress's ``SnapKVPress``; the paper's experiments use a window of 32 and a kernel
of 7. docs/eviction.md gives the measured effect of each choice."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt, window_attention


class SnapKVPolicy(EvictionPolicy):
    name = "snapkv"
    sinks = 0  # the window is what SnapKV protects (recent_window)
    window: int = 64
    pool_kernel: int = 5

    def query_window(self, num_tokens: int) -> int:
        return min(self.window, num_tokens)

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        votes = window_attention(prompt)
        return F.avg_pool1d(votes[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)[:, 0]
