"""IAPT's per-layer soft-prompt generator and the attention to its soft tokens.

Generator (IAPT, Sec. 3.2), from the prompt's hidden states H_l:

    Z = H_l W_down                     (n_p x m)
    P = AttnPool_4(Z)                  (4 x m, one pooling query per soft token)
    S = R_l(P) W_up                    (4 x d, R_l the layer's rational activation)

S are the hidden states of 4 soft tokens. Their keys and values come from the layer's own
(frozen) projection weights, K_s = S W_k^T, V_s = S W_v^T (no bias, no rotary embedding:
a soft token sits at position 0 for every query). An adapted position t attends to them
with a softmax of their own, added to its attention output:

    o_t = Attn(q_t, K, V) + softmax(q_t K_s^T / sqrt(d_h)) V_s

``W_up`` and its bias start at zero, so S = 0, V_s = 0 and the adapter starts as the exact
identity, while the gradient still reaches ``W_up`` from the first step. Decode pays one
4-entry attention per layer. The soft K/V are computed once, at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from vllm_plugins.adapters.common.model_parts import Dims, apply_rotary
from vllm_plugins.adapters.common.pooling import AttentionPooling
from vllm_plugins.adapters.common.prompt_aware import AdapterRuntime, PromptAwareLayer
from vllm_plugins.adapters.common.rational import RationalActivation


@dataclass
class IaptState:
    """Soft keys and values, each (batch, num_soft_tokens, kv_heads, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor


def soft_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of rotated queries (batch, seq, heads, hd) to soft K/V (batch, n, kv_heads, hd).

    Returns (batch, seq, heads, hd). Query head h reads KV head
    h // (heads / kv_heads).
    """
    group = queries.shape[2] // keys.shape[2]
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bshd,bnhd->bhsn", queries, keys) * scaling
    return torch.einsum("bhsn,bnhd->bshd", torch.softmax(scores, dim=-1), values)


class IaptLayer(PromptAwareLayer):
    def __init__(self, dims: Dims, num_soft_tokens: int, bottleneck: int):
        super().__init__()
        self.dims = dims
        self.down = nn.Linear(dims.hidden, bottleneck)
        self.pool = AttentionPooling(bottleneck, num_soft_tokens)
        self.activation = RationalActivation()
        self.up = nn.Linear(bottleneck, dims.hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # The layer's frozen projections, held outside the module tree (not adapter weights).
        self.__dict__["_projections"] = None

    def pool_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(hidden)

    def soft_hidden(self, pooled: torch.Tensor) -> torch.Tensor:
        """S = R_l(P) W_up: the soft tokens' hidden states (batch, num_soft_tokens, d)."""
        return self.up(self.activation(pooled))

    def state_from_pooled(self, pooled: torch.Tensor) -> IaptState:
        soft = self.soft_hidden(pooled)
        k_proj, v_proj = self._projections
        batch, n, _ = soft.shape
        shape = (batch, n, self.dims.num_kv_heads, self.dims.head_dim)
        keys = F.linear(soft, k_proj.weight).view(shape)
        return IaptState(keys=keys, values=F.linear(soft, v_proj.weight).view(shape))

    def install(self, decoder_layer: nn.Module, runtime: AdapterRuntime, index: int) -> list[RemovableHandle]:
        attn = decoder_layer.self_attn
        self.__dict__["_projections"] = (attn.k_proj, attn.v_proj)
        captured: dict[str, torch.Tensor] = {}

        def capture_rotary(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["cos"], captured["sin"] = kwargs["position_embeddings"]

        def capture_queries(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured["q"] = output

        def add_soft_attention(module: nn.Module, args: tuple) -> tuple:
            (attn_out,) = args
            adapt = runtime.adapt_mask(attn_out)
            if adapt is None:
                return args
            state: IaptState = runtime.states[index]
            batch, seq, _ = attn_out.shape
            q = captured.pop("q").view(batch, seq, self.dims.num_heads, self.dims.head_dim)
            q = apply_rotary(q, captured["cos"], captured["sin"])
            extra = soft_attention(q, state.keys, state.values, attn.scaling)
            return (attn_out + adapt * extra.reshape(batch, seq, -1),)

        return [
            attn.register_forward_pre_hook(capture_rotary, with_kwargs=True),
            attn.q_proj.register_forward_hook(capture_queries),
            attn.o_proj.register_forward_pre_hook(add_soft_attention),
        ]
