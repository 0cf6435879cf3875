"""The mechanism shared by IAPT, PARA and MiLoRA on a transformers model.

Data flow of one request::

    prompt --prefill--> per layer l: H_l (the prompt's normalised hidden states entering
    layer l) --compute_state--> state_l  (soft key/values, rescaling vectors or experts)
    every later forward (decode) reuses state_l unchanged.

Where a state acts (decided in docs/methods.md, "Where the adapter acts"): on the *last
prompt token* and on every generated token. The last prompt token's output predicts the
first generated token, so every generated token is shaped by the adapter; earlier prompt
tokens go through the base model untouched. This keeps the method exact under chunked
prefill (attention pooling is a softmax reduction that can be carried across chunks) and
makes every prompt token's hidden state causal, as in the base model.

Each method supplies a :class:`PromptAwareLayer` per decoder layer; this module owns the
hooks' lifecycle and the masks of the current forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vllm_plugins.adapters.common.model_parts import Dims, decoder_layers, dims
from vllm_plugins.adapters.common.pooling import AttentionPooling


@dataclass
class PassMasks:
    """Masks of one forward pass, each (batch, seq) bool.

    ``pool``: prompt tokens to compute the state from; ``None`` in decode passes, which
    reuse the stored state. ``adapt``: positions the adapter acts on.
    """

    pool: torch.Tensor | None
    adapt: torch.Tensor


class AdapterRuntime:
    """Per-model state the hooks read: the current masks and each layer's state."""

    def __init__(self, num_layers: int):
        self.masks: PassMasks | None = None
        self.states: list[Any] = [None] * num_layers

    def adapt_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        """The adapt mask as (batch, seq, 1) in ``like``'s dtype; ``None`` when the base
        model is called directly (outside :meth:`PromptAwareModel.forward`): hooks then
        leave it untouched."""
        if self.masks is None:
            return None
        return self.masks.adapt.unsqueeze(-1).to(like.dtype)


class PromptAwareLayer(nn.Module):
    """One decoder layer's adapter: computes its state at prefill, applies it by hooks.

    The state is ``state_from_pooled(pool(pool_features(H_l)))``: what is pooled
    (``pool_features``), the pooling (``self.pool``, an
    :class:`~vllm_plugins.adapters.common.pooling.AttentionPooling`) and what follows it
    are separate so a server can pool a chunked prompt piecewise.
    """

    pool: AttentionPooling

    def pool_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vectors pooled over the prompt (default: the hidden states themselves)."""
        return hidden

    def state_from_pooled(self, pooled: torch.Tensor) -> Any:
        """State from the pooled vectors (batch, queries, dim)."""
        raise NotImplementedError

    def compute_state(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> Any:
        """State from the prompt's normalised hidden states (batch, seq, d)."""
        return self.state_from_pooled(self.pool(self.pool_features(hidden), pool_mask))

    def install(self, decoder_layer: nn.Module, runtime: AdapterRuntime, index: int) -> list[RemovableHandle]:
        """Register the hooks that apply this layer's state; return their handles."""
        raise NotImplementedError

    def aux_loss(self, state: Any) -> torch.Tensor | None:
        """An extra, already weighted, training loss (MiLoRA's load balance), if any."""
        return None


class PromptAwareModel(nn.Module):
    """A frozen transformers causal LM with one :class:`PromptAwareLayer` per layer."""

    def __init__(self, base: nn.Module, layers: list[PromptAwareLayer]):
        super().__init__()
        self.base = base
        self.adapter_layers = nn.ModuleList(layers)
        self.dims: Dims = dims(base.config)
        for p in base.parameters():
            p.requires_grad_(False)
        self.runtime = AdapterRuntime(len(layers))
        self._handles: list[RemovableHandle] = []
        for index, (decoder_layer, layer) in enumerate(zip(decoder_layers(base), layers)):
            self._handles.append(
                decoder_layer.input_layernorm.register_forward_hook(self._state_hook(index, layer))
            )
            self._handles += layer.install(decoder_layer, self.runtime, index)

    def _state_hook(self, index: int, layer: PromptAwareLayer):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            masks = self.runtime.masks
            if masks is None:
                return
            if masks.pool is not None:
                self.runtime.states[index] = layer.compute_state(output, masks.pool)
            elif self.runtime.states[index] is None:
                raise RuntimeError("decode pass before any prefill: no adapter state")

        return hook

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None,
        adapt_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """A prefill pass (``pool_mask`` given) computes the state; a decode pass reuses it."""
        self.runtime.masks = PassMasks(pool=pool_mask, adapt=adapt_mask)
        try:
            return self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        finally:
            self.runtime.masks = None

    def aux_loss(self) -> torch.Tensor | None:
        losses = [
            loss
            for layer, state in zip(self.adapter_layers, self.runtime.states)
            if state is not None and (loss := layer.aux_loss(state)) is not None
        ]
        return torch.stack(losses).sum() if losses else None

    def reset_state(self) -> None:
        self.runtime.states = [None] * len(self.adapter_layers)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("adapter_layers.")}

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
