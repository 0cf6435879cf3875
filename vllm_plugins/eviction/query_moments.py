"""The mean and covariance of a prompt's queries as future queries would see them: what
expected attention (Devoto, Jeblick and Jégou, arXiv 2510.00636) models the next queries
of each head with.

The paper takes the statistics of the queries before RoPE and rotates them with RoPE's
rotation averaged over the next positions: mu' = R_bar mu, Sigma' = R_bar Sigma R_bar^T
with R_bar the mean of R(f) over the future positions f. The queries are cached rotated
(R(p) q at position p), so each is brought into that frame directly: R_bar R(-p) is the
mean over f of R(f - p), RoPE's rotations of one plane commuting. Per rotation plane i
that mean is a scaled rotation with

    c_i(p) = mean_f cos(phi_i(f) - phi_i(p)),   s_i(p) = mean_f sin(phi_i(f) - phi_i(p)),

``phi_i(p)`` RoPE's angle of plane i at position p, and a query q becomes
q * c + rotate_half(q) * s (RoPE's own formula with the averaged cosine and sine, the
"neox" layout, where plane i pairs dimensions i and i + d/2). The mean and covariance of
those vectors are exactly R_bar mu and R_bar Sigma R_bar^T.

The future positions are the ``FUTURE_POSITIONS`` after the prompt (NVIDIA kvpress's
default), cut at the end of the model's RoPE table. Statistics are merged chunk by chunk
(Chan et al.'s pairwise update), so a prompt prefilled in chunks gets the same moments
as one prefilled at once, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUTURE_POSITIONS = 512


def future_frame(queries: torch.Tensor, positions: torch.Tensor, angles: torch.Tensor, num_prompt: int) -> torch.Tensor:
    """``queries`` (..., t, d), rotated by RoPE at ``positions`` (t,), each rotated instead
    by the mean of RoPE's rotations to the ``FUTURE_POSITIONS`` positions from
    ``num_prompt`` on; float32, same shape.

    ``angles``: (table positions, d / 2), RoPE's angle of each rotation plane at each
    position (radians). Raises ValueError if the table ends before ``num_prompt`` or its
    width is not d / 2.
    """
    d = queries.shape[-1]
    if angles.shape[1] * 2 != d:
        raise ValueError(f"a RoPE table of {angles.shape[1]} planes for queries of {d} dimensions")
    if angles.shape[0] <= num_prompt:
        raise ValueError(f"the RoPE table ends at position {angles.shape[0]}, before the prompt's end {num_prompt}")
    future = angles[num_prompt : num_prompt + FUTURE_POSITIONS].float()
    mean_cos, mean_sin = future.cos().mean(dim=0), future.sin().mean(dim=0)  # (d/2,)
    here = angles[positions].float()
    cos_here, sin_here = here.cos(), here.sin()
    c = cos_here * mean_cos + sin_here * mean_sin  # mean cos(future - here)
    s = cos_here * mean_sin - sin_here * mean_cos  # mean sin(future - here)
    first, second = queries.float().chunk(2, dim=-1)  # plane i: dimensions i and i + d/2
    out = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    out_first, out_second = out.chunk(2, dim=-1)
    torch.mul(first, c, out=out_first).addcmul_(second, s, value=-1)
    torch.mul(second, c, out=out_second).addcmul_(first, s)
    return out


@dataclass
class QueryMoments:
    """Running moments of ``heads`` query heads' vectors: ``count`` vectors each, their
    ``mean`` (heads, d) and ``scatter`` (heads, d, d), the sum of the centred outer
    products; float32."""

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def empty(cls, heads: int, head_dim: int, device: torch.device | str = "cpu") -> QueryMoments:
        return cls(0, torch.zeros(heads, head_dim, device=device), torch.zeros(heads, head_dim, head_dim, device=device))

    def add(self, vectors: torch.Tensor) -> None:
        """Merge ``vectors`` (heads, t, d) into the moments."""
        t = vectors.shape[1]
        if t == 0:
            return
        vectors = vectors.float()
        chunk_mean = vectors.mean(dim=1)
        centred = vectors - chunk_mean[:, None]
        total = self.count + t
        delta = chunk_mean - self.mean
        self.scatter += centred.transpose(1, 2) @ centred + delta[:, :, None] * delta[:, None, :] * (self.count * t / total)
        self.mean += delta * (t / total)
        self.count = total

    @property
    def covariance(self) -> torch.Tensor:
        """(heads, d, d): the population covariance (divided by ``count``, as kvpress
        does); zero before any vector."""
        return self.scatter / max(1, self.count)
