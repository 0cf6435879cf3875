"""MiLoRA on vLLM: each request's top-k experts add p_e * E_e(x) to their module's slice
of the fused outputs (q/k/v in qkv, gate/up in gate_up, o_proj, down_proj).

At prefill the router's choice becomes plain numbers (:class:`ExpertChoice`); per step and
module, the tokens of the requests that chose that module's expert go through one batched
shrink/expand with each token's own expert weights (:func:`vllm_plugins_kernels.expert_lora_`),
as vLLM's LoRA ops do for LoRA slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.adapters.milora.layer import MiloraLayer
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, LayerModules, SiteCall
from vllm_plugins_kernels import expert_lora_

SITE_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass(frozen=True)
class ExpertChoice:
    """A request's active experts in one layer: module name -> router probability p_e."""

    gates: dict[str, float]


def _output_columns(call: SiteCall) -> dict[str, int]:
    """Each module's first column in the site's fused output."""
    d = call.layer.dims
    if call.site == "qkv":
        return {"q_proj": 0, "k_proj": d.q_size, "v_proj": d.q_size + d.kv_size}
    if call.site == "gate_up":
        return {"gate_proj": 0, "up_proj": d.intermediate}
    return {SITE_MODULES[call.site][0]: 0}


class MiloraApplier(Applier):
    method = "milora"
    sites = frozenset(SITE_MODULES)

    def finalize(self, layer: MiloraLayer, pooled: torch.Tensor, modules: LayerModules, request_args: dict) -> ExpertChoice:
        gates = layer.state_from_pooled(pooled).gates[0].tolist()
        return ExpertChoice({name: g for name, g in zip(LINEAR_MODULES, gates) if g > 0})

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[ExpertChoice], adapters: list[MiloraLayer]) -> None:
        for name, start in _output_columns(call).items():
            by_rank: dict[int, list[int]] = {}
            for row, state in enumerate(states):
                if name in state.gates:
                    by_rank.setdefault(adapters[row].experts[name].lora_A.shape[0], []).append(row)
            for rows in by_rank.values():
                self._apply_experts(call, tokens, name, start, rows, states, adapters)

    @staticmethod
    def _apply_experts(call, tokens, name, start, rows, states, adapters) -> None:
        """One batched shrink/expand for the tokens of ``rows`` (requests whose experts for
        ``name`` share a rank), each token with its request's expert weights."""
        slot = torch.full((len(states),), -1, dtype=torch.long)
        slot[rows] = torch.arange(len(rows))
        experts = [adapters[row].experts[name] for row in rows]
        lora_a = torch.stack([e.lora_A for e in experts])  # (slots, r, in)
        lora_b = torch.stack([e.lora_B for e in experts])  # (slots, out, r)
        scale = torch.zeros(len(states))
        scale[rows] = torch.tensor([states[row].gates[name] * e.scaling for row, e in zip(rows, experts)])
        expert_lora_(call.out, call.x, tokens.index, slot[tokens.rows], scale[tokens.rows], lora_a, lora_b, start)
