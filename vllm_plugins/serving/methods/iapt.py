"""IAPT on vLLM: soft keys/values from the layer's own qkv weights at prefill, written
into the request's soft-token slots of the layer's paged KV cache (:mod:`..soft_kv`); at
every adapted token, the soft attention over those slots is added to the attention
output (before o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.adapters.iapt.layer import IaptLayer, soft_attention
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, LayerModules, SiteCall, linear_without_bias
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG, paged_key_value


@dataclass(frozen=True)
class SoftTokenRun:
    """Where a request's soft keys/values sit in each layer's cache: slots
    ``first .. first + count - 1`` of block ``block``."""

    block: int
    first: int
    count: int


class IaptApplier(Applier):
    method = "iapt"
    sites = frozenset({"attention"})

    def finalize(self, layer: IaptLayer, pooled: torch.Tensor, modules: LayerModules, request_args: dict) -> SoftTokenRun:
        if SOFT_KV_SLOT_ARG not in request_args:
            raise RuntimeError("an IAPT request reached the worker without KV slots: serve with PromptAwareScheduler")
        run = SoftTokenRun(*request_args[SOFT_KV_SLOT_ARG])
        d = modules.dims
        qkv = linear_without_bias(modules.qkv_proj, layer.soft_hidden(pooled)[0])  # see adapters/iapt/layer.py
        shape = (-1, d.num_kv_heads, d.head_dim)
        keys = qkv[:, d.q_size : d.q_size + d.kv_size].reshape(shape)
        values = qkv[:, d.q_size + d.kv_size :].reshape(shape)
        key_cache, value_cache = paged_key_value(modules.attn.kv_cache)
        slots = slice(run.first, run.first + run.count)
        key_cache[run.block, :, slots] = keys.transpose(0, 1).to(key_cache.dtype)
        value_cache[run.block, :, slots] = values.transpose(0, 1).to(value_cache.dtype)
        return run

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[SoftTokenRun], adapters) -> None:
        d = call.layer.dims
        idx, rows = tokens.index, tokens.rows
        key_cache, value_cache = paged_key_value(call.layer.attn.kv_cache)
        blocks = torch.tensor([run.block for run in states])[:, None]
        slots = torch.stack([torch.arange(run.first, run.first + run.count) for run in states])
        keys = key_cache[blocks, :, slots][rows].to(call.x.dtype)  # (A, n, kv_heads, hd)
        values = value_cache[blocks, :, slots][rows].to(call.x.dtype)
        q = call.x[idx].view(-1, 1, d.num_heads, d.head_dim)
        extra = soft_attention(q, keys, values, d.head_dim**-0.5)[:, 0]
        call.out[idx] += extra.reshape(len(idx), -1)
