"""Which tokens of a vLLM step belong to which request, and what they do.

vLLM runs one flat batch of tokens per step. A :class:`RequestSlice` records one
request's tokens' range in that batch, the position of its first scheduled token and its
prompt length. From those follow, per request:

* whether it (re)starts from its first token: fresh, or recomputed after preemption;
* the prompt tokens scheduled now, which feed a prompt-aware adapter's pooling
  (positions < n_p);
* the adapted tokens, on which a prompt-aware adapter acts (positions >= n_p - 1);
* the prompt's last tokens scheduled now, whose queries KV eviction scores with;
* whether this step completes the prompt (it holds position n_p - 1): a prompt-aware
  request's state is finalised then, an evicting request's prompt evicted. A prompt
  longer than the scheduler's chunk arrives in several steps.

The model runner walks the step's rows once (:func:`step_slices`). The prompt-aware hooks
get the slices of requests that name an adapter; the eviction hooks get every slice and
follow those of requests with an eviction plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

ADAPTER_ARG = "prompt_adapter"
"""The ``vllm_xargs`` key (``SamplingParams.extra_args``) naming a request's adapter."""
ADAPTER_PATH_ARG = "prompt_adapter_path"
"""The key carrying the adapter's directory, set by the front end that validated it."""


def requested_adapter(sampling_params) -> str | None:
    extra = getattr(sampling_params, "extra_args", None) or {}
    name = extra.get(ADAPTER_ARG)
    return str(name) if name is not None else None


@dataclass(frozen=True)
class RequestSlice:
    req_id: str
    start: int  # first token of the request in the flat batch
    end: int  # one past its last token
    first_position: int  # position of its first scheduled token
    num_prompt: int

    @property
    def restarts(self) -> bool:
        """The request (re)starts from its first token: fresh, or recomputed after preemption."""
        return self.first_position == 0

    @property
    def pool_range(self) -> tuple[int, int]:
        """Flat range of the prompt tokens scheduled now (may be empty)."""
        count = max(0, min(self.end - self.start, self.num_prompt - self.first_position))
        return self.start, self.start + count

    @property
    def completes_prompt(self) -> bool:
        return self.first_position <= self.num_prompt - 1 < self.first_position + (self.end - self.start)

    @property
    def adapted_range(self) -> tuple[int, int]:
        """Flat range of the tokens the adapter acts on (may be empty)."""
        skip = max(0, self.num_prompt - 1 - self.first_position)
        return min(self.start + skip, self.end), self.end

    def prompt_tail(self, window: int) -> slice:
        """Flat rows of the tokens scheduled now at positions [n_p - window, n_p) (may be empty)."""
        lo = max(self.first_position, self.num_prompt - window)
        hi = min(self.first_position + self.end - self.start, self.num_prompt)
        return slice(self.start + lo - self.first_position, self.start + max(lo, hi) - self.first_position)


def step_slices(req_ids: list[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                num_prompt_of: Callable[[str], int]) -> list[RequestSlice]:
    """Every batch row's slice, in row order."""
    slices, start = [], 0
    for row, req_id in enumerate(req_ids):
        count = int(num_scheduled[row])
        slices.append(RequestSlice(req_id, start, start + count, int(num_computed[row]), num_prompt_of(req_id)))
        start += count
    return slices


@dataclass(frozen=True)
class AdaptedTokens:
    """The adapted tokens of one method's requests in a step.

    ``index`` (A,): flat token indices; ``rows`` (A,): each token's request in ``requests``;
    ``per_step``: what an applier derives from them once and reuses in every layer.
    """

    index: torch.Tensor
    rows: torch.Tensor
    requests: list[RequestSlice]
    per_step: dict = field(default_factory=dict, compare=False, repr=False)


class PromptAwareBatch:
    """The prompt-aware requests of one step, and their adapted tokens by method."""

    def __init__(self, slices: list[RequestSlice], methods: dict[str, str]):
        """``methods``: each request's adapter method, by request id."""
        self.slices = slices
        self.by_method: dict[str, AdaptedTokens] = {}
        for method in sorted({methods[s.req_id] for s in slices}):
            reqs = [s for s in slices if methods[s.req_id] == method and s.adapted_range[1] > s.adapted_range[0]]
            if reqs:
                self.by_method[method] = AdaptedTokens(
                    index=torch.cat([torch.arange(*s.adapted_range) for s in reqs]),
                    rows=torch.cat([torch.full((s.adapted_range[1] - s.adapted_range[0],), i) for i, s in enumerate(reqs)]),
                    requests=reqs,
                )
