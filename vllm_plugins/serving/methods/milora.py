"""MiLoRA on vLLM: each request's top-k experts add p_e * E_e(x) to their module's slice
of the fused outputs (q/k/v in qkv, gate/up in gate_up, o_proj, down_proj).

At prefill the router's choice becomes plain numbers (:class:`ExpertChoice`); per step and
module, the tokens of the requests that chose that module's expert go through one batched
shrink/expand with each token's own expert weights, as vLLM's LoRA ops do for LoRA slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.adapters.milora.layer import MiloraLayer
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, LayerModules, SiteCall

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


def _output_slices(call: SiteCall) -> dict[str, slice]:
    d = call.layer.dims
    if call.site == "qkv":
        q, kv = d.q_size, d.kv_size
        return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    if call.site == "gate_up":
        return {"gate_proj": slice(0, d.intermediate), "up_proj": slice(d.intermediate, 2 * d.intermediate)}
    return {SITE_MODULES[call.site][0]: slice(None)}


class MiloraApplier(Applier):
    method = "milora"
    sites = frozenset(SITE_MODULES)

    def finalize(self, layer: MiloraLayer, pooled: torch.Tensor, modules: LayerModules, request_args: dict) -> ExpertChoice:
        gates = layer.state_from_pooled(pooled).gates[0].tolist()
        return ExpertChoice({name: g for name, g in zip(LINEAR_MODULES, gates) if g > 0})

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[ExpertChoice], adapters: list[MiloraLayer]) -> None:
        for name, out_slice in _output_slices(call).items():
            by_rank: dict[int, list[int]] = {}
            for row, state in enumerate(states):
                if name in state.gates:
                    by_rank.setdefault(adapters[row].experts[name].lora_A.shape[0], []).append(row)
            for rows in by_rank.values():
                self._apply_experts(call, tokens, name, out_slice, rows, states, adapters)

    @staticmethod
    def _apply_experts(call, tokens, name, out_slice, rows, states, adapters) -> None:
        """One batched shrink/expand for the tokens of ``rows`` (requests whose experts for
        ``name`` share a rank), each token with its request's expert weights."""
        slot = torch.full((len(states),), -1, dtype=torch.long)
        slot[rows] = torch.arange(len(rows))
        token_slot = slot[tokens.rows]
        chosen = token_slot >= 0
        idx, token_slot = tokens.index[chosen], token_slot[chosen]
        experts = [adapters[row].experts[name] for row in rows]
        lora_a = torch.stack([e.lora_A for e in experts])[token_slot]  # (T, r, in)
        lora_b = torch.stack([e.lora_B for e in experts])[token_slot]  # (T, out, r)
        scaling = torch.tensor([e.scaling for e in experts])[token_slot]
        gate = torch.tensor([states[row].gates[name] for row in rows])[token_slot]
        shrunk = torch.einsum("ti,tri->tr", call.x[idx], lora_a)
        delta = torch.einsum("tr,tor->to", shrunk, lora_b) * scaling[:, None]
        call.out[idx, out_slice] += gate[:, None] * delta
