"""Expected Attention (Devoto, Jeblick and Jégou, arXiv 2510.00636): score each cached
key by the attention that future queries are expected to pay it, the future queries of
a head being modelled as Gaussian, q ~ N(mu, Sigma).

For a query head h, with mu_h and Sigma_h the mean and covariance of its last ``w``
queries, the expected un-normalised attention a key k receives is the Gaussian's moment
generating function at ``scale * k`` (the paper's closed form, its method section):

    E[exp(scale * q . k)] = exp(scale * mu_h . k + scale^2 / 2 * k^T Sigma_h k)

and its share of the prompt's keys is the softmax over the keys j of those exponents:
score_h(j) = z_h(j) - logsumexp_i z_h(i), with
z_h(j) = scale * mu_h . k_j + scale^2 / 2 * k_j^T Sigma_h k_j. A KV head's score is the log
of the mean over its group's query heads of exp(score_h). 4 sinks are kept (the paper
keeps a few; kvpress's press 4), and the prompt's last
:attr:`~.base.EvictionPolicy.recent` tokens, like every policy.

Shapes: ``prompt.keys`` (rows, n, d), rotated as cached; ``prompt.queries``
(rows * group, w, d), the rotated queries of the prompt's last ``w = min(64, n)`` tokens,
a row's ``group`` query heads together; scores (rows, n).

Computed without forming Sigma: mu_h . k is the mean over the window of the logits
q_p . k, and k^T Sigma_h k their variance (with the same 1 / (w - 1)), so the exponent is
scale times the mean plus scale^2 / 2 times the variance of each key's ``w`` window logits,
which is exactly the full-covariance Gaussian, at the memory of SnapKV's
(rows, group * w, n) window logits.

Deviations from the paper:

* **No value norms.** The paper weights the expected attention by the norm of each
  token's value vector (its contribution to the residual stream); a
  :class:`~.base.CachedPrompt` holds no values, so the score is the expected attention
  alone.
* **Rotated queries; the future RoPE rotation is not averaged.** The paper takes the
  query statistics before RoPE and averages the rotation over the next positions (512 in
  kvpress), which damps the fast-rotating, position-bound dimensions of mu and Sigma.
  Here the statistics are those of the window's queries as rotated at their own positions
  (n - w .. n - 1), so a future query is modelled as one more query of the window: its
  position relative to the keys is that of the end of the prompt, not of the tokens to be
  generated. The spread of the window's rotations over w positions enters Sigma.
* **Statistics from the prompt's own last queries**, ``min(64, n)`` of them (the window
  is our choice; 32 and 128 were measured, docs/eviction.md). The paper models hidden
  states as Gaussian and maps them through the query projection; a linear map of a
  Gaussian is the Gaussian of the projected mean and covariance, so only RoPE (above)
  differs. The window is only read, not protected: the paper keeps no window, so the
  policy protects just the last :attr:`~.base.EvictionPolicy.recent` tokens and the
  sinks (protecting all 64 lost most facts at small budgets, docs/eviction.md).
"""

from __future__ import annotations

import math

import torch

from vllm_plugins.eviction.policies.base import EvictionPolicy, CachedPrompt


class ExpectedAttentionPolicy(EvictionPolicy):
    name = "expected_attention"
    window: int = 64  # the prompt's last queries whose mean and covariance model the future ones

    def query_window(self, num_tokens: int) -> int:
        return min(self.window, num_tokens)

    def recent_window(self, num_tokens: int) -> int:
        """The window's queries give statistics only: the last :attr:`recent` tokens are
        protected, as for every policy, not the whole window."""
        return min(num_tokens, self.recent)

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        """(rows, n): log of the expected attention share of each key, the mean over a KV
        head's query heads of softmax_j(scale * mu_h . k_j + scale^2 / 2 * k_j^T Sigma_h k_j)."""
        keys, queries = prompt.keys.float(), prompt.queries.float()
        heads, window, _ = queries.shape
        rows, n, _ = keys.shape
        group = heads // rows
        logits = queries.reshape(rows, group * window, -1) @ keys.transpose(1, 2)  # (rows, group * w, n)
        variance, mean = torch.var_mean(logits.reshape(rows, group, window, n), dim=2, correction=min(1, window - 1))
        exponent = prompt.scale * mean + prompt.scale**2 / 2 * variance  # (rows, group, n)
        return exponent.log_softmax(dim=-1).logsumexp(dim=1) - math.log(group)
