"""Layer wrappers installed into a vLLM decoder at load, as vLLM's LoRA installs its own.

Each wrapped module runs as before and then calls the plugins' custom ops (:mod:`.ops`)
on its output; the ops decide from the step's buffers which tokens, if any, they touch,
so a batch mixing prompt-aware tenants, stock LoRA and the base model goes through one
forward pass. Per decoder layer l:

* ``self_attn.qkv_proj`` -> :class:`PromptAwareLinear` (site ``qkv``, and the prompt's
  pooling and the request state, from its input: the normalised hidden states);
* ``self_attn.attn`` -> :class:`PluginAttention` (site ``attention``, and the queries KV
  eviction scores with);
* ``self_attn.o_proj``, ``mlp.gate_up_proj``, ``mlp.down_proj`` -> :class:`PromptAwareLinear`.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.serving import ops
from vllm_plugins.serving.methods import SITES, LayerModules
from vllm_plugins.serving.methods.base import CacheViews

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")

_LINEAR_SITES = {"qkv": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                 "down": "mlp.down_proj"}


class PromptAwareLinear(nn.Module):
    """A vLLM linear layer whose output the prompt-aware methods act on at ``site``."""

    def __init__(self, base_layer: nn.Module, layer: int, site: str):
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.site = SITES.index(site)
        self.pools = site == "qkv"

    def forward(self, x: torch.Tensor):
        result = self.base_layer(x)
        out = result[0] if isinstance(result, tuple) else result
        dep = ops.prompt_aware_prefill(x, self.layer) if self.pools else None
        ops.prompt_aware_apply(x, out, dep, self.layer, self.site)
        return result


class PluginAttention(nn.Module):
    """vLLM's ``Attention`` of one layer, followed by KV eviction's query capture and the
    prompt-aware methods' attention-site work (IAPT's soft tokens)."""

    def __init__(self, base_layer: nn.Module, layer: int):
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.site = SITES.index("attention")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(query, key, value, *args, **kwargs)
        dep = ops.kv_eviction_capture(query, self.layer)
        ops.prompt_aware_apply(query, out, dep, self.layer, self.site)
        return out


def install_plugin_layers(model: nn.Module, architecture: str, d: Dims, cache_views: CacheViews) -> list[LayerModules]:
    """Wrap every decoder layer's sites; returns the modules the methods read, per layer,
    each reaching its attention's paged KV cache through ``cache_views``.

    Raises ValueError for an architecture whose decoder layout the plugins do not know.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"the plugins serve {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {architecture}")
    layers = []
    for index, decoder_layer in enumerate(model.model.layers):
        attn = decoder_layer.self_attn
        layers.append(LayerModules(index, attn.qkv_proj, attn.attn, d, cache_views))
        for site, path in _LINEAR_SITES.items():
            parent_path, _, name = path.rpartition(".")
            parent = decoder_layer.get_submodule(parent_path)
            setattr(parent, name, PromptAwareLinear(getattr(parent, name), index, site))
        attn.attn = PluginAttention(attn.attn, index)
    return layers
