"""MiLoRA served: each request's top-k experts add p_e * E_e(x) to their module's slice of
the fused outputs (q/k/v in qkv, gate/up in gate_up, o_proj, down_proj; MiLoRA Sec. 3.2).

* Per adapter slot, each layer's experts are stacked like vLLM's LoRA slots:
  ``lora_a[layer][module]`` (max_active, max_rank, in_features) and ``lora_b[layer][module]``
  (max_active, out_features, max_rank), an expert of lower rank zero-padded (exact).
* Per request and layer, ``gates[layer]`` (max_rows, 7) holds p_e * alpha / r for the
  chosen experts and 0 for the others, written once when the prompt completes.

Per step and module, the tokens whose request chose that module's expert go through one
batched shrink/expand, each with its slot's weights (:func:`vllm_plugins_kernels.expert_lora_`).
"""

from __future__ import annotations

import torch

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.adapters.milora.layer import MiloraLayer
from vllm_plugins.serving.methods.base import LayerModules, ServedMethod
from vllm_plugins_kernels import expert_lora_

SITE_MODULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def _first_column(module: str, layer: LayerModules) -> int:
    """The module's first column in the site's fused output."""
    d = layer.dims
    return {"k_proj": d.q_size, "v_proj": d.q_size + d.kv_size, "up_proj": d.intermediate}.get(module, 0)


class MiloraMethod(ServedMethod):
    name = "milora"
    code = 2
    sites = frozenset(SITE_MODULES)

    def __init__(self, layers: list[LayerModules], max_rows: int, settings, device, dtype):
        super().__init__(layers, max_rows, settings, device, dtype)
        d = layers[0].dims
        self.gates = torch.zeros(len(layers), max_rows, len(LINEAR_MODULES), device=device)
        slots, rank = settings.max_active, settings.max_rank
        shapes = {m: d.linear_shape(m) for m in LINEAR_MODULES}
        self.lora_a = [{m: torch.zeros(slots, rank, shapes[m][0], device=device, dtype=dtype) for m in LINEAR_MODULES}
                       for _ in layers]
        self.lora_b = [{m: torch.zeros(slots, shapes[m][1], rank, device=device, dtype=dtype) for m in LINEAR_MODULES}
                       for _ in layers]

    @classmethod
    def check(cls, config, d, settings) -> str | None:
        rank = config.rank
        if not 1 <= rank <= settings.max_rank:
            return f"MiLoRA rank {rank}: the server takes 1 to max_rank {settings.max_rank}"
        return None

    def load(self, slot: int, adapter_layers) -> None:
        for layer, adapter in enumerate(adapter_layers):
            for module, expert in adapter.experts.items():
                rank = expert.lora_A.shape[0]
                self.lora_a[layer][module][slot].zero_()[:rank] = expert.lora_A
                self.lora_b[layer][module][slot].zero_()[:, :rank] = expert.lora_B

    def finalize(self, layer: int, row: int, adapter: MiloraLayer, pooled: torch.Tensor) -> None:
        gates = adapter.state_from_pooled(pooled).gates[0]
        scaling = torch.tensor([adapter.experts[m].scaling for m in LINEAR_MODULES], device=gates.device)
        self.gates[layer, row] = gates * scaling

    def apply(self, site, layer, x, out, index, rows, slots) -> None:
        acted = rows >= 0
        for module in SITE_MODULES[site]:
            # (A,) contiguous, as the kernels read it; a row of -1 reads row 0, unused
            scales = self.gates[layer, :, LINEAR_MODULES.index(module)].index_select(0, rows.clamp(min=0))
            chosen_slots = torch.where(acted & (scales > 0), slots, -1)
            expert_lora_(out, x, index, chosen_slots, scales, self.lora_a[layer][module], self.lora_b[layer][module],
                         _first_column(module, self.layers[layer]))
