"""What an eviction policy sees of a prompt, and what it decides.

A policy's job is to choose which of a prompt's cached tokens each (layer, KV head) keeps,
given how many it may keep: the same number for all (one block table serves every layer
and head), its own choice for each. How many, where the kept tokens go and which blocks are freed is
decided elsewhere (:mod:`vllm_plugins.eviction.budget`, :mod:`vllm_plugins.serving.kv_eviction`,
:mod:`vllm_plugins.serving.block_release`).

Every policy protects some tokens, kept whatever the scores (:meth:`EvictionPolicy.protected_tokens`):
the prompt's last tokens, which hold its question (at least :attr:`EvictionPolicy.recent`,
and by default the query window the policy reads; NACL protects its last 1%, and expected
attention, which reads the prompt's queries for their statistics only, none), and its
leading attention sinks. A budget never
keeps fewer (:func:`vllm_plugins.eviction.budget.min_budget`); should a policy still be
asked for fewer, the first protected tokens win (the most recent ones, then the sinks).

Most policies only score tokens and keep the best ones besides the protected tokens
(:meth:`EvictionPolicy.scores`); NACL (random sampling) and SCA (greedy selection) choose
differently and override :meth:`EvictionPolicy.select`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from vllm_plugins.eviction.query_moments import QueryMoments


@dataclass(frozen=True)
class CachedPrompt:
    """One request's prompt as cached at the end of its prefill, one row per (layer, KV
    head), layer-major.

    ``keys``: (rows, n, head_dim), rotated, exactly as attention cached them; (rows, n, 0)
    for a policy that reads none (:attr:`EvictionPolicy.reads_keys`).
    ``queries``: (rows * group, w, head_dim), the rotated queries of the prompt's last
    ``w`` tokens, ``w = policy.query_window(n)`` (zero for policies that read none), a
    row's ``group`` query heads next to each other (grouped-query attention); empty for a
    policy that reads them as ``query_moments`` instead.
    ``generator``: the request's seeded randomness.
    ``kv_heads``: rows per layer (a policy that chooses per layer groups them).
    ``query_moments``: for a policy with :attr:`EvictionPolicy.queries_as_moments`, the
    moments of the same ``w`` queries in the future frame
    (:mod:`vllm_plugins.eviction.query_moments`), rows * group heads in the same order.
    ``value_norms``: (rows, n), the L2 norms of the cached values, for a policy with
    :attr:`EvictionPolicy.reads_value_norms`.
    """

    keys: torch.Tensor
    queries: torch.Tensor
    scale: float
    generator: torch.Generator
    kv_heads: int
    query_moments: QueryMoments | None = None
    value_norms: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def num_rows(self) -> int:
        return self.keys.shape[0]


class EvictionPolicy:
    """Chooses the tokens each row (layer, KV head) keeps. Subclasses set ``name`` and implement
    :meth:`scores`, or :meth:`select` when keeping the best-scored tokens is not the rule."""

    name: ClassVar[str]
    sinks: ClassVar[int] = 4  # leading "attention sink" tokens (StreamingLLM), always kept
    recent: ClassVar[int] = 8  # the prompt's last tokens (its question), kept by every policy but expected attention
    reads_keys: ClassVar[bool] = True  # the policy reads CachedPrompt.keys (else the worker gathers none)
    queries_as_moments: ClassVar[bool] = False  # the window's queries reach the policy as their QueryMoments only
    reads_value_norms: ClassVar[bool] = False  # the policy reads CachedPrompt.value_norms

    def query_window(self, num_tokens: int) -> int:
        """How many of the prompt's last queries the policy reads."""
        return 0

    def recent_window(self, num_tokens: int) -> int:
        """How many of the prompt's last tokens the policy always keeps: at least
        :attr:`recent`, and by default the query window it reads (SnapKV's observation
        window)."""
        return min(num_tokens, max(self.recent, self.query_window(num_tokens)))

    def protected_tokens(self, num_tokens: int) -> list[int]:
        """The tokens kept whatever the scores, most important first: the recent window,
        newest first, then the sinks. A budget keeps at least all of them; below that, the
        first ones win (the end of the question before the sinks)."""
        window = self.recent_window(num_tokens)
        return list(range(num_tokens - 1, num_tokens - window - 1, -1)) + list(range(min(self.sinks, num_tokens - window)))

    def scores(self, prompt: CachedPrompt) -> torch.Tensor:
        """(rows, n) float scores; besides the protected tokens, the highest are kept."""
        raise NotImplementedError

    def select(self, prompt: CachedPrompt, num_kept: int) -> torch.Tensor:
        """(rows, num_kept) ascending indices of the tokens each row keeps."""
        return keep_best(self.scores(prompt), num_kept, self.protected_tokens(prompt.num_tokens))


def keep_best(scores: torch.Tensor, num_kept: int, protected: Sequence[int] = ()) -> torch.Tensor:
    """Per row, the indices of the ``num_kept`` tokens kept, ascending: the ``protected``
    ones first (token indices, most important first, as many as fit), then the highest
    scores. Equal scores go to the earlier token, so the choice does not depend on how
    the selection runs. ``scores`` (rows, n) are compared as float32; a NaN counts as the
    lowest finite score (above -inf, which a policy uses to exclude a token).

    The selection runs on unique integer keys: a token's float32 score mapped to an
    order-preserving integer, times 2**32, plus a tie-breaker that favours earlier tokens;
    a protected token's key is above every score's. CPU tensors go through one compiled
    call (:mod:`vllm_plugins.eviction.best_tokens`), others through ``topk``.

    Raises ValueError if ``num_kept`` is not in [0, n].
    """
    n = scores.shape[-1]
    if not 0 <= num_kept <= n:
        raise ValueError(f"cannot keep {num_kept} of {n} tokens")
    lowest = torch.finfo(torch.float32).min
    scores = torch.nan_to_num(scores.float(), nan=lowest, posinf=math.inf, neginf=-math.inf)
    first = list(protected)[:num_kept]
    if scores.device.type == "cpu":
        # imported here: numba adds half a second to the start-up of every process that
        # imports the policies (front end, CLI), most of which never evict
        from vllm_plugins.eviction.best_tokens import best_tokens

        return torch.from_numpy(best_tokens(scores.numpy(), np.asarray(first, dtype=np.int64), num_kept))
    return keep_best_torch(scores, num_kept, first)


def keep_best_torch(scores: torch.Tensor, num_kept: int, first: list[int]) -> torch.Tensor:
    """:func:`keep_best`'s selection with ``topk``, on any device: ``scores`` float32
    without NaN, ``first`` the protected tokens that fit."""
    rows, n = scores.shape
    bits = (scores + 0.0).view(torch.int32).long()  # + 0.0: -0.0 ties with 0.0
    ordered = torch.where(bits < 0, NEGATIVE_BITS - bits, bits)  # a float32's order, as an integer
    keys = ordered * TIE_RANGE + torch.arange(n - 1, -1, -1, device=scores.device)
    if first:
        keys[:, first] = PROTECTED - torch.arange(len(first), device=scores.device)
    best = keys.topk(num_kept, dim=-1, sorted=False).indices
    kept = torch.zeros(rows, n, dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return kept.nonzero()[:, 1].reshape(rows, num_kept).contiguous()


TIE_RANGE = 1 << 32  # above any token index
NEGATIVE_BITS = -(1 << 31) - 1  # a negative float32's int32 bits b map to this - b: ascending with the value
PROTECTED = (1 << 63) - 1  # the key of the most important protected token; the next ones count down


def window_attention(prompt: CachedPrompt) -> torch.Tensor:
    """(rows, n): the attention the window's queries pay to each cached token.

    For row (layer, KV head) g and token j, the sum over the query heads h of g's group
    and the window's queries p of softmax_j(q_{p,h} . k_{j,g} * scale), causal (query p, at
    position n - w + p, sees tokens j <= n - w + p): NACL's proxy-token score (Sec. 3.2)
    and SnapKV's observation-window vote (Sec. 4.2) before pooling.
    """
    keys, queries = prompt.keys.float(), prompt.queries.float()
    heads, window, _ = queries.shape
    rows, n, _ = keys.shape
    group = heads // rows
    logits = (queries.reshape(rows, group * window, -1) * prompt.scale) @ keys.transpose(1, 2)
    future = torch.ones(window, window, dtype=torch.bool, device=logits.device).triu(1)  # query p, token n - w + c: c > p
    logits[..., n - window :].masked_fill_(future.repeat(group, 1), float("-inf"))
    # softmax in place, its sum over queries as one product: one (rows, group * w, n)
    # buffer rather than three, whose fresh pages cost more than the arithmetic
    probabilities = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    normalisers = probabilities.sum(dim=-1, keepdim=True).reciprocal_()
    return (normalisers.transpose(1, 2) @ probabilities)[:, 0]
