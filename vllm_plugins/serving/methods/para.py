"""PARA served: Q' = l_q * Q and V' = l_v * V in the fused qkv output, U' = l_u * U in the
fused gate/up output (vLLM orders it [gate; up]), one rescaling pass per site
(:func:`vllm_plugins_kernels.rescale_columns_`, PARA Sec. 3.2).

Per request and layer the vectors sit in two tables: ``qkv[layer]`` (max_rows, q + kv)
holds [l_q; l_v], ``up[layer]`` (max_rows, intermediate) holds l_u. PARA keeps no
weights per slot: its generator runs once per request, at :meth:`ParaMethod.finalize`.
"""

from __future__ import annotations

import torch

from vllm_plugins.adapters.para.layer import ParaLayer
from vllm_plugins.serving.methods.base import LayerModules, ServedMethod
from vllm_plugins_kernels import rescale_columns_


class ParaMethod(ServedMethod):
    name = "para"
    code = 1
    sites = frozenset({"qkv", "gate_up"})

    def __init__(self, layers: list[LayerModules], max_rows: int, settings, device, dtype):
        super().__init__(layers, max_rows, settings, device, dtype)
        d = layers[0].dims
        self.qkv = torch.ones(len(layers), max_rows, d.q_size + d.kv_size, device=device, dtype=dtype)
        self.up = torch.ones(len(layers), max_rows, d.intermediate, device=device, dtype=dtype)

    @classmethod
    def check(cls, config, d, settings) -> str | None:
        bottleneck = config.bottleneck
        return None if 1 <= bottleneck <= d.hidden else f"PARA bottleneck {bottleneck}: the server takes 1 to the model's hidden size {d.hidden}"

    def finalize(self, layer: int, row: int, adapter: ParaLayer, pooled: torch.Tensor) -> None:
        state = adapter.state_from_pooled(pooled)
        self.qkv[layer, row] = torch.cat([state.l_q[0], state.l_v[0]])
        self.up[layer, row] = state.l_u[0]

    def apply(self, site, layer, x, out, index, rows, slots) -> None:
        d = self.layers[layer].dims
        if site == "qkv":
            rescale_columns_(out, index, rows, self.qkv[layer], ((0, d.q_size), (d.q_size + d.kv_size, d.kv_size)))
        else:
            rescale_columns_(out, index, rows, self.up[layer], ((d.intermediate, d.intermediate),))
