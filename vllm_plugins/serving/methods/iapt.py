"""IAPT on vLLM: soft keys/values from the layer's own qkv weights at prefill; at every
adapted token, the 4-entry soft attention added to the attention output (before o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.adapters.iapt.layer import IaptLayer, soft_attention
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, LayerModules, SiteCall, linear_without_bias


@dataclass
class SoftKV:
    keys: torch.Tensor  # (num_soft_tokens, kv_heads, head_dim)
    values: torch.Tensor


class IaptApplier(Applier):
    method = "iapt"
    sites = frozenset({"attention"})

    def finalize(self, layer: IaptLayer, pooled: torch.Tensor, modules: LayerModules) -> SoftKV:
        d = modules.dims
        qkv = linear_without_bias(modules.qkv_proj, layer.soft_hidden(pooled)[0])  # see adapters/iapt/layer.py
        shape = (-1, d.num_kv_heads, d.head_dim)
        keys = qkv[:, d.q_size : d.q_size + d.kv_size].reshape(shape)
        values = qkv[:, d.q_size + d.kv_size :].reshape(shape)
        return SoftKV(keys=keys, values=values)

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[SoftKV], adapters) -> None:
        d = call.layer.dims
        idx, rows = tokens.index, tokens.rows
        q = call.x[idx].view(-1, 1, d.num_heads, d.head_dim)
        keys = torch.stack([s.keys for s in states])[rows]
        values = torch.stack([s.values for s in states])[rows]
        extra = soft_attention(q, keys, values, d.head_dim**-0.5)[:, 0]
        call.out[idx] += extra.reshape(len(idx), -1)
