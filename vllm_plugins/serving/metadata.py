"""The per-step inputs of the prompt-aware ops, in persistent buffers.

:class:`PromptAwareMetadata` plays the role of vLLM's punica wrapper for LoRA: the model
runner writes each step's token-to-request map into buffers preallocated at load
(:meth:`update`, in place, before the forward pass) and clears it after; the custom ops
read the buffers and nothing else of the step. So a traced-once compiled forward, or a
replayed graph, sees each step's values through the same tensors.

Per token (``max_tokens``): ``token_rows`` the state row of its request (-1: no
prompt-aware adapter), ``token_pooled`` whether it is a prompt token, ``token_adapted``
whether the adapter acts on it. Per state row (``max_rows``): ``row_method`` (the served
method's code), ``row_slot`` (its adapter's slot this step) and ``row_completes`` (this
step holds its last prompt token).
"""

from __future__ import annotations

import numpy as np
import torch


class PromptAwareMetadata:
    def __init__(self, max_tokens: int, max_rows: int):
        self.token_rows = torch.full((max_tokens,), -1, dtype=torch.int64)
        self.token_pooled = torch.zeros(max_tokens, dtype=torch.bool)
        self.token_adapted = torch.zeros(max_tokens, dtype=torch.bool)
        self.row_method = torch.full((max_rows,), -1, dtype=torch.int64)
        self.row_slot = torch.full((max_rows,), -1, dtype=torch.int64)
        self.row_completes = torch.zeros(max_rows, dtype=torch.bool)
        self._filled = 0  # tokens written by the last update

    def update(self, token_rows: np.ndarray, pooled: np.ndarray, adapted: np.ndarray,
               completing_rows: list[int]) -> None:
        """Write one step's map: (tokens,) arrays and the state rows whose prompt completes."""
        self.clear()
        n = len(token_rows)
        self.token_rows[:n] = torch.from_numpy(token_rows)
        self.token_pooled[:n] = torch.from_numpy(pooled & (token_rows >= 0))
        self.token_adapted[:n] = torch.from_numpy(adapted & (token_rows >= 0))
        self.row_completes[completing_rows] = True
        self._filled = n

    def clear(self) -> None:
        """No prompt-aware token: what the ops see outside a step (profiling, warm-up)."""
        n = self._filled
        self.token_rows[:n] = -1
        self.token_pooled[:n] = False
        self.token_adapted[:n] = False
        self.row_completes.fill_(False)
        self._filled = 0
