"""PARA on vLLM: Q' = l_q * Q and V' = l_v * V in the fused qkv output, U' = l_u * U in
the fused gate/up output (vLLM orders it [gate; up]), one rescaling pass per site
(:func:`vllm_plugins_kernels.rescale_columns_`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.adapters.para.layer import ParaLayer
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, LayerModules, SiteCall
from vllm_plugins_kernels import rescale_columns_


@dataclass(frozen=True)
class ParaScales:
    """A request's vectors for one layer as the sites use them: [l_q; l_v] (1, q + kv) for
    the qkv output and l_u (1, intermediate) for the gate/up output."""

    qkv: torch.Tensor
    up: torch.Tensor


class ParaApplier(Applier):
    method = "para"
    sites = frozenset({"qkv", "gate_up"})

    def finalize(self, layer: ParaLayer, pooled: torch.Tensor, modules: LayerModules, request_args: dict) -> ParaScales:
        state = layer.state_from_pooled(pooled)
        return ParaScales(torch.cat([state.l_q, state.l_v], dim=-1), state.l_u)

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[ParaScales], adapters) -> None:
        d = call.layer.dims
        if call.site == "qkv":
            scales, segments = torch.cat([s.qkv for s in states]), ((0, d.q_size), (d.q_size + d.kv_size, d.kv_size))
        else:
            scales, segments = torch.cat([s.up for s in states]), ((d.intermediate, d.intermediate),)
        rescale_columns_(call.out, tokens.index, tokens.rows, scales, segments)
