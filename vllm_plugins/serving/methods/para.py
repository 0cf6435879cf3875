"""PARA on vLLM: Q' = l_q * Q and V' = l_v * V in the fused qkv output, U' = l_u * U in
the fused gate/up output (vLLM orders it [gate; up])."""

from __future__ import annotations

import torch

from vllm_plugins.adapters.para.layer import ParaState
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, SiteCall


class ParaApplier(Applier):
    method = "para"
    sites = frozenset({"qkv", "gate_up"})

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[ParaState], adapters) -> None:
        d = call.layer.dims
        idx, rows = tokens.index, tokens.rows
        if call.site == "qkv":
            l_q = torch.cat([s.l_q for s in states])[rows]
            l_v = torch.cat([s.l_v for s in states])[rows]
            call.out[idx, : d.q_size] *= l_q
            call.out[idx, d.q_size + d.kv_size :] *= l_v
        else:
            l_u = torch.cat([s.l_u for s in states])[rows]
            call.out[idx, d.intermediate :] *= l_u
