"""NACL (Chen et al., ACL 2024, arXiv 2408.03675).

The proxy tokens P are the prompt's last tokens (its question); a cached token's score
is the attention P pays it (:func:`~.base.window_attention`, the paper's Eq. 4 summed
over the proxy queries). The kept set is, per KV head:

* protected: the attention sinks and P itself;
* proxy-selected: the best-scored remaining tokens, a third of what is left;
* random: the rest, sampled without replacement with probability proportional to the
  score (the paper's random eviction, Eq. 7, drawn per layer and head), through Gumbel top-k.

The paper's 20% budget splits 2% protected / 6% proxy / 12% random; the one-third /
two-thirds split of the unprotected part reproduces that ratio at any budget.
"""

from __future__ import annotations

import math

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt, keep_best, window_attention


class NaclPolicy(EvictionPolicy):
    name = "nacl"
    proxy_fraction: float = 0.01
    min_proxy: int = 8
    proxy_share: float = 1 / 3  # of the unprotected budget; the rest is sampled

    def query_window(self, num_tokens: int) -> int:
        return min(num_tokens, max(self.min_proxy, math.ceil(self.proxy_fraction * num_tokens)))

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        scores = window_attention(prompt)
        protected = self.protected_tokens(prompt.num_tokens)  # the sinks and the proxy tokens
        unprotected = max(0, num_kept - len(protected))
        num_sampled = unprotected - round(self.proxy_share * unprotected)
        chosen = keep_best(scores, num_kept - num_sampled, protected)
        if num_sampled == 0:
            return chosen
        # drawn from the request's (CPU) generator wherever the cache is: the same draws on any device
        uniform = torch.rand(scores.shape, generator=prompt.generator).to(scores.device).clamp_min(1e-20)
        # a token no query attends to (its score underflowed to 0) still gets a finite key,
        # below every other: only the chosen tokens' -inf keeps them from being drawn twice
        gumbel_keys = scores.clamp_min(torch.finfo(scores.dtype).tiny).log() - (-uniform.log()).log()
        gumbel_keys.scatter_(1, chosen, float("-inf"))
        sampled = keep_best(gumbel_keys, num_sampled)
        return torch.cat([chosen, sampled], dim=1).sort(dim=1).values
