"""Prompt-aware adapters inside a vLLM model: per-request state at prefill, applied per token.

Data flow of one step (the runner calls :meth:`PromptAwareHooks.begin_step` with the
step's :class:`~vllm_plugins.serving.batch.RequestSlice` list and each request's
``extra_args``: its adapter's directory and, for IAPT, its soft tokens' KV slots):

    input_layernorm of layer l (normalised H_l, flat tokens)
        -> pool the prompt tokens scheduled now into each request's running PoolStats
        -> if the step completes a request's prompt: state_l = applier.finalize(...)
    qkv_proj / attn / o_proj / gate_up_proj / down_proj of layer l
        -> each method's applier edits the outputs of its adapted tokens

States live per request id until the request finishes; a request that restarts from
position 0 (preempted and recomputed) starts over from an empty state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.common.pooling import PoolStats
from vllm_plugins.serving.adapter_cache import AdapterCache, LoadedAdapter
from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG, PromptAwareBatch, RequestSlice
from vllm_plugins.serving.methods import APPLIERS, LayerModules
from vllm_plugins.serving.methods.base import SiteCall

# site -> the module under a vLLM decoder layer whose output the appliers edit
SITES = {
    "qkv": "self_attn.qkv_proj",
    "attention": "self_attn.attn",
    "o_proj": "self_attn.o_proj",
    "gate_up": "mlp.gate_up_proj",
    "down": "mlp.down_proj",
}


@dataclass
class RequestState:
    adapter: LoadedAdapter
    args: dict  # the request's extra_args
    pooling: list[PoolStats | None]
    states: list[Any] = field(default_factory=list)

    @classmethod
    def fresh(cls, adapter: LoadedAdapter, args: dict, num_layers: int) -> RequestState:
        return cls(adapter=adapter, args=args, pooling=[None] * num_layers, states=[None] * num_layers)


class PromptAwareHooks:
    def __init__(self, model: nn.Module, cache: AdapterCache):
        self.cache = cache
        self.dims: Dims = cache.dims
        self.requests: dict[str, RequestState] = {}
        self.batch: PromptAwareBatch | None = None
        self.compute_state_calls = 0  # how many (request, layer) states were finalised
        self.most_adapters_in_a_step = 0
        decoder_layers = model.model.layers
        self.layers = [
            LayerModules(i, layer.self_attn.qkv_proj, layer.self_attn.attn, self.dims)
            for i, layer in enumerate(decoder_layers)
        ]
        for modules, layer in zip(self.layers, decoder_layers):
            layer.input_layernorm.register_forward_hook(self._layer_input_hook(modules))
            for site, path in SITES.items():
                layer.get_submodule(path).register_forward_hook(self._site_hook(site, modules))

    # -- per step ---------------------------------------------------------------------
    def begin_step(self, slices: list[RequestSlice], request_args: dict[str, dict]) -> None:
        """``slices``: the step's prompt-aware requests; ``request_args``: their ``extra_args``."""
        for s in slices:
            if s.restarts or s.req_id not in self.requests:
                args = request_args[s.req_id]
                adapter = self.cache.get(str(args[ADAPTER_ARG]), args[ADAPTER_PATH_ARG])
                self.requests[s.req_id] = RequestState.fresh(adapter, args, len(self.layers))
        adapters = {str(request_args[s.req_id][ADAPTER_ARG]) for s in slices}
        self.most_adapters_in_a_step = max(self.most_adapters_in_a_step, len(adapters))
        methods = {s.req_id: self.requests[s.req_id].adapter.method for s in slices}
        self.batch = PromptAwareBatch(slices, methods) if slices else None

    def end_step(self) -> None:
        self.batch = None

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.requests.pop(req_id, None)

    # -- hooks ------------------------------------------------------------------------
    def _layer_input_hook(self, modules: LayerModules):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if self.batch is None:
                return
            normed = output[0] if isinstance(output, tuple) else output
            for s in self.batch.slices:
                self._pool(s, modules, normed)

        return hook

    def _pool(self, s: RequestSlice, modules: LayerModules, normed: torch.Tensor) -> None:
        req = self.requests[s.req_id]
        layer = req.adapter.layers[modules.index]
        lo, hi = s.pool_range
        if hi > lo:
            part = layer.pool.partial(layer.pool_features(normed[lo:hi]))
            prev = req.pooling[modules.index]
            req.pooling[modules.index] = part if prev is None else prev.merge(part)
        if s.completes_prompt:
            pooled = req.pooling[modules.index].pooled().unsqueeze(0)
            req.states[modules.index] = APPLIERS[req.adapter.method].finalize(layer, pooled, modules, req.args)
            req.pooling[modules.index] = None
            self.compute_state_calls += 1

    def _site_hook(self, site: str, modules: LayerModules):
        def hook(module: nn.Module, args: tuple, output):
            if self.batch is None:
                return None
            out = output[0] if isinstance(output, tuple) else output
            x = args[0]
            for method, tokens in self.batch.by_method.items():
                applier = APPLIERS[method]
                if site not in applier.sites:
                    continue
                reqs = [self.requests[s.req_id] for s in tokens.requests]
                applier.apply(
                    SiteCall(site, modules, x, out),
                    tokens,
                    [r.states[modules.index] for r in reqs],
                    [r.adapter.layers[modules.index] for r in reqs],
                )
            return None  # outputs were edited in place

        return hook
