"""What a prompt-aware method is when served: tables, stacked weights and two duties.

A :class:`ServedMethod` owns

* its per-request tables, indexed by the request's state row (``[max_rows, ...]`` per
  layer), written once when the request's prompt completes (:meth:`finalize`);
* the adapter weights its per-token work needs, stacked in adapter slots
  (``[max_active, ...]``), written once when an adapter is activated (:meth:`load`);
* its per-token work at the module sites of a decoder layer (:meth:`apply`), batched
  over every token the method acts on in the step.

Both duties run inside the plugins' custom ops (:mod:`..ops`), which read the step's
token-to-row map from :class:`~..metadata.PromptAwareMetadata`. The adapter math itself
lives in ``vllm_plugins/adapters/<method>/``: :meth:`finalize` calls the adapter's own
``state_from_pooled``, so served and reference states are computed by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareLayer
from vllm_plugins.serving.config import PromptAdapterSettings

SITES = ("qkv", "attention", "o_proj", "gate_up", "down")
"""The module sites of a vLLM decoder layer the methods act at, in forward order: the
outputs of ``self_attn.qkv_proj``, ``self_attn.attn``, ``self_attn.o_proj``,
``mlp.gate_up_proj`` and ``mlp.down_proj``."""


def linear_without_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T through a vLLM linear layer's own kernel, without its bias or any LoRA.

    vLLM's CPU build repacks linear weights for its GEMM and drops ``.weight``, so the
    layer's quantisation method (its ``apply``) is the way to its weights.
    """
    while hasattr(module, "base_layer"):  # the plugins' and vLLM's LoRA wrappers
        module = module.base_layer
    return module.quant_method.apply(module, x)


CacheViews = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]
"""An attention layer -> token-major (keys, values) views (num_blocks, kv_heads,
block_size, head_dim) of its paged KV cache, in the backend's layout
(:func:`~vllm_plugins.serving.paged_cache.paged_key_value` for vLLM's)."""


@dataclass(frozen=True)
class LayerModules:
    """A vLLM decoder layer's modules the methods read, and the model's sizes."""

    index: int
    qkv_proj: nn.Module
    attn: nn.Module  # vLLM's Attention (or the decode-step harness's), which holds the layer's paged KV cache
    dims: Dims
    cache_views: CacheViews

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major (keys, values) views of the layer's paged KV cache."""
        return self.cache_views(self.attn)


class ServedMethod:
    name: ClassVar[str]
    code: ClassVar[int]  # the method's number in PromptAwareMetadata.row_method
    sites: ClassVar[frozenset[str]]

    def __init__(self, layers: list[LayerModules], max_rows: int, settings: PromptAdapterSettings,
                 device: torch.device | str, dtype: torch.dtype):
        """Tables for ``max_rows`` requests (vLLM's max_num_seqs) and ``settings.max_active``
        adapter slots, on the model's ``device``; what the per-token work reads of them is
        in the model's ``dtype``."""
        self.layers = layers
        self.dtype = dtype

    @classmethod
    def check(cls, config, d: Dims, settings: PromptAdapterSettings) -> str | None:
        """Why the server cannot hold an adapter of the method with ``config`` (its
        manifest's configuration dataclass) within ``settings``' limits, or None."""
        return None

    def load(self, slot: int, adapter_layers: nn.ModuleList) -> None:
        """Write an adapter's weights into slot ``slot`` of the stacked weights."""

    def start(self, row: int, request_args: dict) -> None:
        """A request (re)starts in state row ``row``; ``request_args``: its extra_args."""

    def finalize(self, layer: int, row: int, adapter: PromptAwareLayer, pooled: torch.Tensor) -> None:
        """Row ``row``'s state for ``layer`` from its pooled prompt (1, queries, dim)."""
        raise NotImplementedError

    def apply(self, site: str, layer: int, x: torch.Tensor, out: torch.Tensor, index: torch.Tensor,
              rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Act on ``out`` (the site's output; ``x`` its input) in place at tokens ``index``
        (A,), whose state rows are ``rows`` (A,; -1: a token the method leaves alone) and
        adapter slots ``slots`` (A,). No host reads of tensors: the call may be captured in
        a CUDA graph."""
        raise NotImplementedError
