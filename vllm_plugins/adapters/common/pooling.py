"""Self-attention pooling over the prompt span.

    u = H w,   a = softmax(u) over the prompt's tokens,   pooled = a^T H

with one column of ``w`` per pooled vector. Padding and generated tokens never enter:
the mask excludes them before the softmax, so a prompt pools to the same vector whatever
else shares its batch. ``w`` starts at zero, i.e. as mean pooling.
"""

from __future__ import annotations

import torch
from torch import nn


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
