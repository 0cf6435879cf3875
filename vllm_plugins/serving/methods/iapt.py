"""IAPT served: at the step that completes the prompt, the soft tokens' keys/values come
from the layer's own qkv weights and are written into the request's soft-token slots of
the layer's paged KV cache (:mod:`..soft_kv`); at every adapted token, the soft attention
over those slots is added to the attention output, before o_proj (IAPT Sec. 3.2,
``adapters/iapt/layer.py``).

Per request, ``runs`` (max_rows, 3) holds where its soft tokens sit: block, first slot
and count, the same in every layer. The scheduler chose them; :meth:`IaptMethod.start`
copies them from the request's ``extra_args``.
"""

from __future__ import annotations

import torch

from vllm_plugins.adapters.iapt.layer import IaptLayer
from vllm_plugins.serving.methods.base import LayerModules, ServedMethod, linear_without_bias
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG
from vllm_plugins_kernels import soft_attention_paged_, write_soft_kv


class IaptMethod(ServedMethod):
    name = "iapt"
    code = 0
    sites = frozenset({"attention"})

    def __init__(self, layers: list[LayerModules], max_rows: int, settings, device, dtype):
        super().__init__(layers, max_rows, settings, device, dtype)
        self.runs = torch.zeros(max_rows, 3, dtype=torch.int64, device=device)
        self.max_soft_tokens = settings.max_soft_tokens

    @classmethod
    def check(cls, config, d, settings) -> str | None:
        count = config.num_soft_tokens
        if not 1 <= count <= settings.max_soft_tokens:
            return f"{count} IAPT soft tokens: the server takes 1 to max_soft_tokens {settings.max_soft_tokens}"
        bottleneck = config.bottleneck
        if not 1 <= bottleneck <= d.hidden:
            return f"IAPT bottleneck {bottleneck}: the server takes 1 to the model's hidden size {d.hidden}"
        return None

    def start(self, row: int, request_args: dict) -> None:
        if SOFT_KV_SLOT_ARG not in request_args:
            raise RuntimeError("an IAPT request reached the worker without KV slots: serve with PromptAwareScheduler")
        self.runs[row] = torch.tensor(request_args[SOFT_KV_SLOT_ARG])

    def finalize(self, layer: int, row: int, adapter: IaptLayer, pooled: torch.Tensor) -> None:
        modules = self.layers[layer]
        d = modules.dims
        qkv = linear_without_bias(modules.qkv_proj, adapter.soft_hidden(pooled)[0].to(self.dtype))
        shape = (-1, d.num_kv_heads, d.head_dim)
        # Finite whatever the adapter: soft keys/values that overflowed to inf/NaN stayed in their KV block after
        # the request and turned base-model answers into '' (tests/test_hardening.py, overflow test).
        qkv = qkv.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        keys = qkv[:, d.q_size : d.q_size + d.kv_size].reshape(shape)
        values = qkv[:, d.q_size + d.kv_size :].reshape(shape)
        key_cache, value_cache = modules.key_value()
        block, first, _ = self.runs[row]
        write_soft_kv(key_cache, value_cache, keys[None], values[None], block[None], first[None])

    def apply(self, site, layer, x, out, index, rows, slots) -> None:
        modules = self.layers[layer]
        key_cache, value_cache = modules.key_value()
        soft_attention_paged_(out, x, index, rows, self.runs, key_cache, value_cache, self.max_soft_tokens,
                              modules.dims.head_dim**-0.5)
