"""PARA's per-layer vector generator and its application.

From the prompt's hidden states H_l the generator emits three vectors once per request
(PARA, Sec. 3.2):

    p = AttnPool(H_l),   [l_q; l_v; l_u] = 1 + W_up GeLU(W_down p)

and the layer rescales element-wise: Q' = l_q * Q, V' = l_v * V, U' = l_u * U (U the FFN's
up projection). ``W_up`` starts at zero, so the adapter starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.common.pooling import AttentionPooling
from vllm_plugins.adapters.common.prompt_aware import AdapterRuntime, PromptAwareLayer


@dataclass
class ParaState:
    """Per-request rescaling vectors, each (batch, size)."""

    l_q: torch.Tensor
    l_v: torch.Tensor
    l_u: torch.Tensor


class ParaLayer(PromptAwareLayer):
    def __init__(self, dims: Dims, bottleneck: int):
        super().__init__()
        self.sizes = (dims.q_size, dims.kv_size, dims.intermediate)
        self.pool = AttentionPooling(dims.hidden)
        self.down = nn.Linear(dims.hidden, bottleneck)
        self.up = nn.Linear(bottleneck, sum(self.sizes))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def state_from_pooled(self, pooled: torch.Tensor) -> ParaState:
        vectors = 1.0 + self.up(F.gelu(self.down(pooled.squeeze(1))))
        return ParaState(*torch.split(vectors, self.sizes, dim=-1))

    def install(self, decoder_layer: nn.Module, runtime: AdapterRuntime, index: int) -> list[RemovableHandle]:
        def scaler(field: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                adapt = runtime.adapt_mask(output)
                if adapt is None:
                    return output
                scale = getattr(runtime.states[index], field).unsqueeze(1)  # (batch, 1, size)
                return output * (1.0 + adapt * (scale - 1.0))

            return hook

        return [
            decoder_layer.self_attn.q_proj.register_forward_hook(scaler("l_q")),
            decoder_layer.self_attn.v_proj.register_forward_hook(scaler("l_v")),
            decoder_layer.mlp.up_proj.register_forward_hook(scaler("l_u")),
        ]
