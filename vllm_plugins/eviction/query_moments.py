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

``phi_i(p)`` RoPE's angle of plane i at position p, and a query's plane (x, y) becomes
(x c - y s, y c + x s), RoPE's own formula with the averaged cosine and sine. The mean
and covariance of those vectors are exactly R_bar mu and R_bar Sigma R_bar^T.

The future positions are the ``FUTURE_POSITIONS`` after the prompt (NVIDIA kvpress's
default), cut at the end of the model's RoPE table (its last position alone if the prompt
reaches it). Statistics are merged chunk by chunk (Chan et al.'s pairwise update), so a
prompt prefilled in chunks gets the same moments as one prefilled at once, up to
rounding.

Both of vLLM's RoPE layouts are read (:class:`RopeTable`): "neox", plane i pairing
dimensions i and i + r/2, and interleaved (GPT-J), pairing 2i and 2i + 1; with partial
rotary embeddings the r rotated dimensions come first and the others pass unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUTURE_POSITIONS = 512


@dataclass(frozen=True)
class RopeTable:
    """RoPE as a model applies it: ``cos`` and ``sin`` (table positions, planes), float32,
    the cosine and sine of each rotation plane's angle at each position; ``interleaved``:
    plane i pairs dimensions 2i and 2i + 1 (GPT-J), else i and i + planes (neox).
    Dimensions from 2 x planes on are not rotated."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool = False

    @classmethod
    def from_angles(cls, angles: torch.Tensor, interleaved: bool = False) -> RopeTable:
        """The table of RoPE's angles (positions, planes), in radians."""
        return cls(angles.float().cos(), angles.float().sin(), interleaved)

    @classmethod
    def from_cos_sin(cls, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> RopeTable:
        """The table of a model's RoPE cosines and sines, (positions, planes) each (any
        common scale, such as YaRN's, drops out)."""
        norm = torch.hypot(cos.float(), sin.float()).clamp_min(torch.finfo(torch.float32).tiny)
        return cls(cos.float() / norm, sin.float() / norm, interleaved)

    def to(self, device: torch.device | str) -> RopeTable:
        return RopeTable(self.cos.to(device), self.sin.to(device), self.interleaved)


class FutureFrame:
    """The mean of RoPE's rotations to the ``FUTURE_POSITIONS`` positions from
    ``num_prompt`` on, as seen from each of ``positions`` (t,): built once for a prefill
    chunk, applied to each layer's queries.

    Its cosines and sines, (t, planes) each, cost two means, two gathers and a few
    products; applying it costs four products per query element. Raises ValueError when
    applied to queries of fewer than 2 x planes dimensions.
    """

    def __init__(self, rope: RopeTable, positions: torch.Tensor, num_prompt: int):
        future = slice(min(num_prompt, rope.cos.shape[0] - 1), num_prompt + FUTURE_POSITIONS)
        mean_cos, mean_sin = rope.cos[future].mean(dim=0), rope.sin[future].mean(dim=0)  # (planes,)
        cos_here, sin_here = rope.cos[positions], rope.sin[positions]
        self.cos = cos_here * mean_cos + sin_here * mean_sin  # mean cos(future - here)
        self.sin = cos_here * mean_sin - sin_here * mean_cos  # mean sin(future - here)
        self.interleaved = rope.interleaved

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        """``queries`` (..., t, d), rotated by RoPE at the frame's positions, in any
        layout, rotated instead by the frame's mean rotation; float32, same shape,
        contiguous (a transposed view is read as it lies, not copied first)."""
        planes, d = self.cos.shape[1], queries.shape[-1]
        if 2 * planes > d:
            raise ValueError(f"a RoPE table of {planes} planes for queries of {d} dimensions")
        q = queries.float()
        if 2 * planes < d:  # dimensions not rotated pass unchanged
            out = q.clone(memory_format=torch.contiguous_format)
        else:
            out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        first, second, out_first, out_second = _pairs(q, out, planes, self.interleaved)
        torch.mul(first, self.cos, out=out_first).addcmul_(second, self.sin, value=-1)
        torch.mul(second, self.cos, out=out_second).addcmul_(first, self.sin)
        return out


def _pairs(q: torch.Tensor, out: torch.Tensor, planes: int, interleaved: bool):
    """The two members of every rotation plane, in ``q`` and in ``out`` (views)."""
    if interleaved:
        return q[..., 0 : 2 * planes : 2], q[..., 1 : 2 * planes : 2], out[..., 0 : 2 * planes : 2], out[..., 1 : 2 * planes : 2]
    return q[..., :planes], q[..., planes : 2 * planes], out[..., :planes], out[..., planes : 2 * planes]


@dataclass
class QueryMoments:
    """Running moments of ``heads`` query heads' vectors: per head, ``count`` (heads,)
    vectors, their ``mean`` (heads, d) and ``scatter`` (heads, d, d), the sum of the
    centred outer products; float32. Heads are merged into in any groups (a layer or
    several at a time), each at its own count."""

    count: torch.Tensor
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def empty(cls, heads: int, head_dim: int, device: torch.device | str = "cpu") -> QueryMoments:
        return cls(torch.zeros(heads, device=device), torch.zeros(heads, head_dim, device=device),
                   torch.zeros(heads, head_dim, head_dim, device=device))

    def add(self, vectors: torch.Tensor, heads: slice = slice(None)) -> None:
        """Merge ``vectors`` (h, t, d), t more of each, into the moments of ``heads`` (h
        of them)."""
        t = vectors.shape[1]
        if t == 0:
            return
        vectors = vectors.float()
        chunk_mean = vectors.mean(dim=1)
        centred = vectors - chunk_mean[:, None]
        before = self.count[heads]
        total = before + t
        delta = chunk_mean - self.mean[heads]
        weight = (before * t / total)[:, None, None]
        self.scatter[heads] += centred.transpose(1, 2) @ centred + delta[:, :, None] * delta[:, None, :] * weight
        self.mean[heads] += delta * (t / total)[:, None]
        self.count[heads] = total

    @property
    def covariance(self) -> torch.Tensor:
        """(heads, d, d): the population covariance (divided by ``count``, as kvpress
        does); zero before any vector."""
        return self.scatter / self.count.clamp(min=1)[:, None, None]
