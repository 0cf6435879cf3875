"""Which tokens of a vLLM step belong to which request, and what they do.

vLLM runs one flat batch of tokens per step, the requests' tokens one after the other in
the order of the input batch's rows. From each row's scheduled token count, its number
of computed tokens (the position of its first scheduled token) and its prompt length
follow, per token and per row:

* its position, and whether it is a prompt token (position < n_p): a prompt-aware
  adapter pools the prompt tokens;
* whether the adapter acts on it (position >= n_p - 1, docs/methods.md);
* whether the row (re)starts from its first token (fresh, or recomputed after
  preemption) and whether this step completes its prompt (it holds position n_p - 1): a
  prompt-aware request's state is finalised then, an evicting request's prompt evicted.
  A prompt longer than the scheduler's chunk arrives in several steps.

The model runner builds one :class:`StepBatch` per step, before the forward pass, and the
prompt-aware and eviction sides turn it into the per-step buffers their ops read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

ADAPTER_ARG = "prompt_adapter"
"""The ``extra_args`` key naming a request's prompt-aware adapter."""
ADAPTER_PATH_ARG = "prompt_adapter_path"
"""The key carrying the adapter's directory, set by the front end that validated it."""


def requested_adapter(sampling_params) -> str | None:
    extra = getattr(sampling_params, "extra_args", None) or {}
    name = extra.get(ADAPTER_ARG)
    return str(name) if name is not None else None


@dataclass(frozen=True)
class StepBatch:
    """One step's requests in batch-row order.

    ``num_scheduled``, ``num_computed``, ``num_prompt``: (rows,) int64 arrays, the tokens
    scheduled now, the position of the first of them, and the prompt length.
    """

    req_ids: list[str]
    num_scheduled: np.ndarray
    num_computed: np.ndarray
    num_prompt: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.num_scheduled.sum())

    @cached_property
    def token_row(self) -> np.ndarray:
        """(tokens,) each token's batch row."""
        return np.repeat(np.arange(len(self.req_ids)), self.num_scheduled)

    @cached_property
    def starts(self) -> np.ndarray:
        """(rows,) each row's first token in the flat batch."""
        return np.cumsum(self.num_scheduled) - self.num_scheduled

    @cached_property
    def positions(self) -> np.ndarray:
        """(tokens,) each token's position in its request."""
        rows = self.token_row
        return self.num_computed[rows] + np.arange(self.num_tokens) - self.starts[rows]

    @property
    def is_prompt(self) -> np.ndarray:
        """(tokens,) the token is a prompt token (it is pooled)."""
        return self.positions < self.num_prompt[self.token_row]

    @property
    def is_adapted(self) -> np.ndarray:
        """(tokens,) a prompt-aware adapter acts on the token."""
        return self.positions >= self.num_prompt[self.token_row] - 1

    @property
    def restarts(self) -> np.ndarray:
        """(rows,) the request (re)starts from its first token."""
        return self.num_computed == 0

    @property
    def completes_prompt(self) -> np.ndarray:
        """(rows,) this step holds the request's last prompt token."""
        last = self.num_prompt - 1
        return (self.num_computed <= last) & (last < self.num_computed + self.num_scheduled)

    def prompt_tail(self, row: int, window: int) -> tuple[int, int, int]:
        """(first flat token, count, offset in the window) of the row's tokens scheduled now
        at positions [n_p - window, n_p); count may be 0."""
        first_position = int(self.num_computed[row])
        lo = max(first_position, int(self.num_prompt[row]) - window)
        hi = min(first_position + int(self.num_scheduled[row]), int(self.num_prompt[row]))
        offset = lo - (int(self.num_prompt[row]) - window)
        return int(self.starts[row]) + lo - first_position, max(0, hi - lo), offset
