"""The per-step inputs of the prompt-aware ops.

:class:`PromptAwareMetadata` plays the role of vLLM's punica wrapper for LoRA: the model
runner writes each step's token-to-request map into buffers preallocated at load, on the
model's device (:meth:`update`, in place, before the forward pass) and clears it after.
What the ops read is of two kinds, by the kind of op (docs/serving.md, "CUDA graphs"):

* device buffers, the only inputs of ``prompt_aware_apply``, which a CUDA graph may hold:
  per method and token (``num_methods, max_tokens``), ``method_rows`` the token's state
  row if that method acts on it, else -1, and ``method_slots`` that row's adapter slot,
  else -1; ``token_index`` is 0, 1, 2, ... (the kernels are fed every token of the step
  and leave the -1 ones alone, so a replayed graph needs no index list of the step);
* host values, read by the host-driven ``prompt_aware_prefill`` (which runs eagerly, and
  a step that has some never replays a full graph): ``pooled``, the step's prompt tokens
  per state row as (row, first token, end token, whether it is the row's first chunk),
  and ``completing``, the rows whose prompt completes this step.

``active_methods`` (host) holds the codes of the methods with an adapted token in the
step: the apply op launches nothing for the others, and a step with none replays the
graphs captured without prompt-aware adapters (as vLLM keys its graphs by LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PooledChunk:
    """A state row's prompt tokens in the step's flat batch: [first, end)."""

    row: int
    first: int
    end: int
    fresh: bool  # the row's first chunk: nothing pooled before it


class PromptAwareMetadata:
    def __init__(self, num_methods: int, max_tokens: int, device: torch.device):
        self.method_rows = torch.full((num_methods, max_tokens), -1, dtype=torch.int64, device=device)
        self.method_slots = torch.full((num_methods, max_tokens), -1, dtype=torch.int64, device=device)
        self.token_index = torch.arange(max_tokens, device=device)
        self.active_methods: frozenset[int] = frozenset()
        self.pooled: list[PooledChunk] = []
        self.completing: list[int] = []
        self._filled = 0  # tokens written by the last update

    def update(self, method_rows: np.ndarray, method_slots: np.ndarray, pooled: list[PooledChunk],
               completing: list[int]) -> None:
        """Write one step's map: ``method_rows``, ``method_slots`` (num_methods, tokens),
        -1 where the method leaves the token alone."""
        self.clear()
        n = method_rows.shape[1]
        self.method_rows[:, :n] = torch.from_numpy(method_rows)
        self.method_slots[:, :n] = torch.from_numpy(method_slots)
        self.active_methods = frozenset(np.flatnonzero((method_rows >= 0).any(axis=1)).tolist())
        self.pooled, self.completing = pooled, completing
        self._filled = n

    def clear(self) -> None:
        """No prompt-aware token: what the ops see outside a step (profiling, warm-up)."""
        n = self._filled
        self.method_rows[:, :n] = -1
        self.method_slots[:, :n] = -1
        self.active_methods = frozenset()
        self.pooled, self.completing = [], []
        self._filled = 0
