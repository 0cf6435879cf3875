"""Expected Attention (Devoto, Jeblick and Jégou, arXiv 2510.00636): score each cached
key by the attention that future queries are expected to pay it, the future queries of
a head being modelled as Gaussian, q ~ N(mu, Sigma), and weight it by its value's norm.

For a query head h, the expected un-normalised attention a key k receives is the
Gaussian's moment generating function at ``scale * k`` (the paper's closed form, its
method section):

    E[exp(scale * q . k)] = exp(scale * mu_h . k + scale^2 / 2 * k^T Sigma_h k)

and its share of the prompt's keys is the softmax over the keys j of those exponents
z_h(j). A KV head's score of token j is the mean over its group's query heads of that
share, times the norm of j's cached value (the paper's weighting by each token's
contribution to the output): log-domain here, score(j) = log mean_h softmax_j(z_h) +
log ||v_j||.

mu_h and Sigma_h are the mean and covariance of every prompt query of head h after the
``sinks`` (kvpress's statistics, the question included), taken before RoPE and rotated
by RoPE's rotation averaged over the next 512 positions
(:mod:`vllm_plugins.eviction.query_moments`, which the worker and the reference fill as
the prompt is computed). The exponents of all of a row's query heads come from one
product of the keys with the heads' stacked covariances (rows, d, group * d), d x d per
head rather than one logit per query and key, as many rows at a time as
:data:`PRODUCT_ELEMENTS` allows.

Kept whatever the scores: the 4 sinks, as in the paper and kvpress's press. Unlike every
other policy it protects none of the prompt's last tokens: their expected attention
decides, as in the paper (protecting the last 8 lost 13 points of facts on the crowded
task at keep 0.1, docs/eviction.md).

Shapes: ``prompt.keys`` (rows, n, d) rotated as cached; ``prompt.query_moments`` over rows
* group heads, a row's group together; ``prompt.value_norms`` (rows, n); scores (rows, n).
"""

from __future__ import annotations

import math

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt

PRODUCT_ELEMENTS = 1 << 24
"""Elements of the keys' products with the stacked covariances computed at once (as
many rows as fit, at least one): 64 MB of float32 at most, the whole prompt of a small
model in one product, a layer or less of a large one."""


class ExpectedAttentionPolicy(EvictionPolicy):
    name = "expected_attention"
    queries_as_moments = True
    reads_value_norms = True

    def query_window(self, num_tokens: int) -> int:
        """Every query after the sinks gives the statistics."""
        return max(0, num_tokens - self.sinks)

    def recent_window(self, num_tokens: int) -> int:
        """None of the prompt's last tokens is protected (the paper keeps the sinks only)."""
        return 0

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        """(rows, n): log of the mean over a KV head's query heads of
        softmax_j(scale * mu_h . k_j + scale^2 / 2 * k_j^T Sigma_h k_j), plus log ||v_j||.

        Raises ValueError without the prompt's query moments or value norms."""
        moments, norms = prompt.query_moments, prompt.value_norms
        if moments is None or norms is None:
            raise ValueError("expected attention reads the prompt's query moments and value norms")
        keys = prompt.keys.float()
        rows, n, d = keys.shape
        group = moments.mean.shape[0] // rows
        scale = prompt.scale
        mean = moments.mean.view(rows, group, d)
        covariance = moments.covariance.view(rows, group, d, d) * (scale**2 / 2)
        stacked = covariance.permute(0, 2, 1, 3).reshape(rows, d, group * d)  # column block h: Sigma_h (symmetric)
        exponent = keys.new_empty(rows, group, n)
        per_product = max(1, PRODUCT_ELEMENTS // (n * group * d))  # rows whose (n, group * d) products fit at once
        for first in range(0, rows, per_product):
            part = slice(first, first + per_product)
            quadratic = ((keys[part] @ stacked[part]).view(-1, n, group, d) * keys[part, :, None]).sum(dim=-1)
            quadratic.baddbmm_(keys[part], mean[part].transpose(1, 2), alpha=scale)  # + scale * k . mu_h
            exponent[part] = quadratic.transpose(1, 2)
        share = exponent.log_softmax(dim=-1).logsumexp(dim=1) - math.log(group)
        return share + norms.float().log()
