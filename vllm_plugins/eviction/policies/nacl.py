"""NACL (Chen et al., ACL 2024, arXiv 2408.03675; the authors' code: PaddlePaddle/Research,
NLP/ACL2024-NACL).

The proxy tokens P are the prompt's last 1%, and never fewer than 20 (the authors' code
evicts only prompts of at least 2,048 tokens, so it never reads fewer); a cached token's
score is the attention P pays it (:func:`~.base.window_attention`, summed over the proxy
queries and a KV head's query heads). The kept set is, per KV head:

* protected: the attention sinks and the prompt's last 1% (at least
  :attr:`~.base.EvictionPolicy.recent`), sized apart from P as in the authors' code;
* proxy-selected: the best-scored remaining tokens, a third of what is left;
* random: the rest, sampled without replacement with probability proportional to the
  score (the paper's random eviction, drawn per layer and head), through Gumbel top-k.

The paper's 20% budget splits 2% protected / 6% proxy / 12% random; the one-third /
two-thirds split of the unprotected part reproduces that ratio at any budget.
docs/eviction.md measures each choice against the paper and the authors' code.
"""

from __future__ import annotations

import math

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt, keep_best, window_attention


class NaclPolicy(EvictionPolicy):
    name = "nacl"
    proxy_fraction: float = 0.01  # the proxy tokens and the protected recent tokens: the prompt's last 1%
    min_proxy: int = 20  # 1% of 2,048, the shortest prompt the authors' code evicts
    proxy_share: float = 1 / 3  # of the unprotected budget; the rest is sampled

    def query_window(self, num_tokens: int) -> int:
        return min(num_tokens, max(self.min_proxy, math.ceil(self.proxy_fraction * num_tokens)))

    def recent_window(self, num_tokens: int) -> int:
        """The last 1% of the prompt, at least :attr:`recent` (8): below 1,901 tokens fewer
        than the 20 proxy tokens, and below 800 tokens more than 1%."""
        return min(num_tokens, max(self.recent, math.ceil(self.proxy_fraction * num_tokens)))

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        scores = window_attention(prompt)
        protected = self.protected_tokens(prompt.num_tokens)  # the sinks and the last 1%
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
