"""Self-attention pooling over the prompt span.

    u = H w,   a = softmax(u) over the prompt's tokens,   pooled = a^T H

with one column of ``w`` per pooled vector. Padding and generated tokens never enter:
the mask excludes them before the softmax, so a prompt pools to the same vector whatever
else shares its batch. ``w`` starts at zero, i.e. as mean pooling.

The softmax reduction also runs piecewise (:class:`PoolStats`, the running max / sum /
weighted sum of an online softmax), so a server can pool a prompt that arrives in chunks
and get the same vector as one pass over the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PoolStats:
    """Partial sums of attention pooling over part of one prompt.

    ``peak`` (queries,): the largest score seen; ``total`` (queries,): sum of
    exp(u - peak); ``weighted`` (queries, dim): sum of exp(u - peak) * h.
    """

    peak: torch.Tensor
    total: torch.Tensor
    weighted: torch.Tensor

    def merge(self, other: PoolStats) -> PoolStats:
        peak = torch.maximum(self.peak, other.peak)
        a, b = torch.exp(self.peak - peak), torch.exp(other.peak - peak)
        return PoolStats(
            peak=peak,
            total=self.total * a + other.total * b,
            weighted=self.weighted * a.unsqueeze(-1) + other.weighted * b.unsqueeze(-1),
        )

    def pooled(self) -> torch.Tensor:
        """The pooled vectors (queries, dim)."""
        return self.weighted / self.total.unsqueeze(-1)


class AttentionPooling(nn.Module):
    def __init__(self, dim: int, num_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim, num_queries))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` (batch, seq, dim), ``mask`` (batch, seq) bool -> (batch, queries, dim)."""
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every row needs at least one prompt token to pool over")
        scores = hidden @ self.query.to(hidden.dtype)  # (batch, seq, queries)
        scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return weights.transpose(1, 2) @ hidden

    def partial(self, hidden: torch.Tensor) -> PoolStats:
        """Partial sums over ``hidden`` (tokens, dim), all of them prompt tokens of one request."""
        if hidden.shape[0] == 0:
            raise ValueError("no prompt tokens to pool over")
        scores = hidden @ self.query.to(hidden.dtype)  # (tokens, queries)
        peak = scores.max(dim=0).values
        e = torch.exp(scores - peak)
        return PoolStats(peak=peak, total=e.sum(0), weighted=e.T @ hidden)
