"""IAPT on vLLM: soft keys/values from the layer's own qkv weights at prefill, written
into the request's soft-token slots of the layer's paged KV cache (:mod:`..soft_kv`); at
every adapted token, the soft attention over those slots is added to the attention
output (before o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.adapters.iapt.layer import IaptLayer
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, LayerModules, SiteCall, linear_without_bias
from vllm_plugins.serving.paged_cache import paged_key_value
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG
from vllm_plugins_kernels import soft_attention_paged_, write_soft_kv


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
        key_cache, value_cache = paged_key_value(modules.attn)
        write_soft_kv(key_cache, value_cache, keys[None], values[None], torch.tensor([run.block]), torch.tensor([run.first]))
        return run

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[SoftTokenRun], adapters) -> None:
        key_cache, value_cache = paged_key_value(call.layer.attn)
        scale = call.layer.dims.head_dim**-0.5
        for count, index, blocks, first in self._token_slots(tokens, states):
            soft_attention_paged_(call.out, call.x, index, blocks, first, key_cache, value_cache, count, scale)

    @staticmethod
    def _token_slots(tokens: AdaptedTokens, states: list[SoftTokenRun]) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(soft tokens, adapted tokens, their block, their first slot) for each soft-token
        count among the requests; the same in every layer, so built once per step."""
        if "iapt_slots" not in tokens.per_step:
            blocks = torch.tensor([run.block for run in states])[tokens.rows]
            first = torch.tensor([run.first for run in states])[tokens.rows]
            counts = torch.tensor([run.count for run in states])[tokens.rows]
            groups = []
            for count in counts.unique().tolist():
                chosen = counts == count
                groups.append((count, tokens.index[chosen], blocks[chosen], first[chosen]))
            tokens.per_step["iapt_slots"] = groups
        return tokens.per_step["iapt_slots"]
