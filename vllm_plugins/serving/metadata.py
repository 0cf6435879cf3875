"""The per-step inputs of the prompt-aware ops, in persistent buffers.

:class:`PromptAwareMetadata` plays the role of vLLM's punica wrapper for LoRA: the model
runner writes each step's token-to-request map into buffers preallocated at load
(:meth:`update`, in place, before the forward pass) and clears it after; the custom ops
read the buffers and nothing else of the step. So a traced-once compiled forward, or a
replayed CUDA graph, sees each step's values through the same tensors.

On the model's device, what the per-token work reads (it may be captured in a CUDA
graph, so it gets fixed shapes and no host reads):

* ``method_rows`` (methods, max_tokens): for each served method (by its ``code``) and
  token, the token's state row if that method acts on it, else -1;
* ``token_slots`` (max_tokens,): the adapter slot of the token's request (-1: none);
* ``all_tokens``: 0, 1, 2, ... (the index of every token, what a fixed-shape call passes).

On the host, what the prefill's pooling reads (it chooses rows on the host and runs only
in steps with a prompt token): per token ``token_rows`` (its request's state row, -1: no
prompt-aware adapter) and ``token_pooled`` (a prompt token); per state row
``row_method`` (the served method's code), ``row_slot`` (its adapter's slot) and
``row_completes`` (this step holds its last prompt token); and per step ``pooling`` (some
token is pooled) and ``acting[code]`` (the method acts on some token).

A captured CUDA graph holds the methods acting while it was captured; vLLM captures on
dummy batches, which have no prompt-aware token, so :meth:`capturing` marks every method
acting (or none) for the capture, and the graphs are keyed by whether a step has an
acting method (:mod:`.cuda_graphs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


class PromptAwareMetadata:
    def __init__(self, max_tokens: int, max_rows: int, num_methods: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.method_rows = torch.full((num_methods, max_tokens), -1, dtype=torch.int64, device=device)
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.all_tokens = torch.arange(max_tokens, device=device)
        self.token_rows = torch.full((max_tokens,), -1, dtype=torch.int64)
        self.token_pooled = torch.zeros(max_tokens, dtype=torch.bool)
        self.row_method = torch.full((max_rows,), -1, dtype=torch.int64)
        self.row_slot = torch.full((max_rows,), -1, dtype=torch.int64)
        self.row_completes = torch.zeros(max_rows, dtype=torch.bool)
        self.pooling = False
        self.acting = [False] * num_methods
        self._filled = 0  # tokens written by the last update

    def update(self, token_rows: np.ndarray, pooled: np.ndarray, adapted: np.ndarray,
               completing_rows: list[int]) -> None:
        """Write one step's map: (tokens,) arrays and the state rows whose prompt completes.

        Reads ``row_method`` and ``row_slot`` of the rows named, which the caller sets first.
        """
        self.clear()
        n = len(token_rows)
        named = token_rows >= 0
        safe_rows = np.where(named, token_rows, 0)
        codes = np.where(named, self.row_method.numpy()[safe_rows], -1)
        of_method = codes[None, :] == np.arange(len(self.acting))[:, None]  # (methods, tokens)
        method_rows = np.where(of_method & adapted & named, token_rows, -1)
        self.method_rows[:, :n] = torch.from_numpy(method_rows)
        self.token_slots[:n] = torch.from_numpy(np.where(named, self.row_slot.numpy()[safe_rows], -1))
        self.token_rows[:n] = torch.from_numpy(token_rows)
        self.token_pooled[:n] = torch.from_numpy(pooled & named)
        self.row_completes[completing_rows] = True
        self.pooling = bool((pooled & named).any())
        self.acting = [bool((row >= 0).any()) for row in method_rows]
        self._filled = n

    def clear(self) -> None:
        """No prompt-aware token: what the ops see outside a step (profiling, warm-up)."""
        n = self._filled
        self.method_rows[:, :n] = -1
        self.token_slots[:n] = -1
        self.token_rows[:n] = -1
        self.token_pooled[:n] = False
        self.row_completes.fill_(False)
        self.pooling = False
        self.acting = [False] * len(self.acting)
        self._filled = 0

    @contextlib.contextmanager
    def capturing(self, with_adapters: bool) -> Iterator[None]:
        """While vLLM warms up and captures a CUDA graph: every method acting
        (``with_adapters``: the graph holds every method's kernels, each fed every token,
        -1 for the ones it leaves alone) or none, whatever the step's map holds."""
        self.acting = [with_adapters] * len(self.acting)
        try:
            yield
        finally:
            self.acting = [False] * len(self.acting)
