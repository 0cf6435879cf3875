"""One calling convention for every adapted model, prompt-aware or not.

Training, generation and evaluation call ``lm(input_ids, attention_mask, pool_mask,
adapt_mask, position_ids=..., past_key_values=..., use_cache=...)``. A
:class:`~vllm_plugins.adapters.common.prompt_aware.PromptAwareModel` reads the masks; a
:class:`PlainLM` (the bare base model or a PEFT LoRA model) ignores them.
"""

from __future__ import annotations

import torch
from torch import nn


class PlainLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        adapt_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def reset_state(self) -> None:
        """Nothing to reset: a plain model keeps no per-request state."""
