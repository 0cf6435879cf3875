"""MiLoRA on vLLM: each request's top-k experts add p_e * E_e(x) to their module's slice
of the fused outputs (q/k/v in qkv, gate/up in gate_up, o_proj, down_proj)."""

from __future__ import annotations

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.adapters.milora.layer import MiloraLayer, MiloraState
from vllm_plugins.serving.batch import AdaptedTokens
from vllm_plugins.serving.methods.base import Applier, SiteCall

SITE_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


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

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[MiloraState], adapters: list[MiloraLayer]) -> None:
        slices = _output_slices(call)
        for row, (state, layer) in enumerate(zip(states, adapters)):
            idx = tokens.index[tokens.rows == row]
            x = call.x[idx]
            for name in SITE_MODULES[call.site]:
                gate = state.gates[0, LINEAR_MODULES.index(name)]
                if gate > 0:
                    call.out[idx, slices[name]] += gate * layer.experts[name](x)
