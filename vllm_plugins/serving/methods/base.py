from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareLayer
from vllm_plugins.serving.batch import AdaptedTokens


def linear_without_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T through a vLLM linear layer's own kernel, without its bias or any LoRA.

    vLLM's CPU build repacks linear weights for its GEMM and drops ``.weight``, so the
    layer's quantisation method (its ``apply``) is the way to its weights.
    """
    base = getattr(module, "base_layer", module)  # unwrap vLLM's LoRA wrapper
    return base.quant_method.apply(base, x)


@dataclass(frozen=True)
class LayerModules:
    """A vLLM decoder layer's modules the appliers read, and its sizes."""

    index: int
    qkv_proj: nn.Module
    attn: nn.Module  # vLLM's Attention; ``attn.kv_cache`` is the layer's paged KV cache
    dims: Dims


@dataclass(frozen=True)
class SiteCall:
    """One hook call: the module's input ``x`` and output ``out`` (edited in place)."""

    site: str
    layer: LayerModules
    x: torch.Tensor
    out: torch.Tensor


class Applier:
    method: str
    sites: frozenset[str]

    def finalize(self, layer: PromptAwareLayer, pooled: torch.Tensor, modules: LayerModules, request_args: dict) -> Any:
        """A request's state for one layer from its pooled prompt (1, queries, dim);
        ``request_args`` are the request's ``extra_args``."""
        return layer.state_from_pooled(pooled)

    def apply(self, call: SiteCall, tokens: AdaptedTokens, states: list[Any], adapters: list[PromptAwareLayer]) -> None:
        """Act on ``call.out`` at ``tokens``; ``states[i]``/``adapters[i]`` belong to request i."""
        raise NotImplementedError
