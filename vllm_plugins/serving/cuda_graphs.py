"""The plugins under vLLM's CUDA graphs (GPU worker): which op a graph may hold, and
which graph a step replays.

vLLM 0.32 compiles a GPU model's forward and replays it as CUDA graphs; by default
(``FULL_AND_PIECEWISE``) a uniform decode step replays one full graph of the forward, and
other steps replay graphs of the pieces between "splitting ops", which run eagerly
(attention is one). A replayed graph runs no Python: an op inside it reads its per-step
inputs from buffers at fixed addresses, written before the replay. By what they read
(docs/serving.md, "CUDA graphs"):

* ``prompt_aware_apply`` reads only device buffers (:mod:`.metadata`) and launches the
  Triton kernels with no host synchronisation: full and piecewise graphs hold it. It
  launches the kernels of the methods acting in the step (``metadata.acting``), so a
  graph holds those acting while it was captured. As vLLM captures its graphs with and
  without LoRA, every graph is captured twice, on vLLM's dummy batches: without
  prompt-aware adapters (no method acting: the op launches nothing) and with them (every
  method marked acting, :meth:`~.metadata.PromptAwareMetadata.capturing`: each method's
  kernels fed every token, -1 rows for the tokens it leaves alone).
  :class:`PluginBatchDescriptor` carries the key; a step with some method acting
  replays the graphs with adapters, where the methods not acting find only -1 rows.
* ``prompt_aware_prefill`` and ``kv_eviction_capture`` are host-driven
  (:data:`HOST_DRIVEN_OPS`): they choose rows and tokens on the host and run each
  adapter's own modules. They are splitting ops (eager between the pieces), a full graph
  holds them as no-ops, and a step where either has work never replays a full graph.
* A step with an evicted request narrows attention's metadata by handing the backend
  another block table and other seq_lens (:mod:`.kv_eviction`), while a full graph reads
  the runner's own tensors: such a step never replays a full graph either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from vllm_plugins.serving import vllm_internals as vi

HOST_DRIVEN_OPS = ("vllm_plugins::prompt_aware_prefill", "vllm_plugins::kv_eviction_capture")
"""The plugins' ops that must run eagerly, as vLLM's graph-splitting ops."""


@dataclass(frozen=True)
class StepGraphs:
    """What the step about to run (or the graph being captured) asks of the graphs."""

    prompt_adapters: bool  # some method acts in the step: the graphs holding every method's kernels
    full_graph: bool  # no host-driven op has work and no attention is narrowed: a full graph may replay it


@dataclass(frozen=True)
class PluginBatchDescriptor(vi.BatchDescriptor):
    """vLLM's key of a CUDA graph, and whether the graph holds the prompt-aware kernels."""

    prompt_adapters: bool = False


class PluginCudagraphDispatcher(vi.CudagraphDispatcher):
    """vLLM's dispatcher with every key twice, without and with prompt-aware adapters, and
    no full graph for a step that cannot replay one.

    ``step_graphs()`` answers for the step being dispatched; the runner sets it up before
    each step and each capture."""

    step_graphs: Callable[[], StepGraphs]
    _keys_with_adapters: bool | None = None  # set while the keys are registered

    @classmethod
    def for_runner(cls, vllm_config, step_graphs: Callable[[], StepGraphs]) -> PluginCudagraphDispatcher:
        dispatcher = cls(vllm_config)
        dispatcher.step_graphs = step_graphs
        return dispatcher

    def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len: int = 1) -> None:
        try:
            for with_adapters in (False, True):
                self._keys_with_adapters = with_adapters
                super().initialize_cudagraph_keys(cudagraph_mode, uniform_decode_query_len)
        finally:
            self._keys_with_adapters = None

    def _create_padded_batch_descriptor(self, num_tokens: int, uniform_decode: bool, has_lora: bool,
                                        num_active_loras: int = 0) -> PluginBatchDescriptor:
        descriptor = super()._create_padded_batch_descriptor(num_tokens, uniform_decode, has_lora, num_active_loras)
        with_adapters = self._keys_with_adapters
        if with_adapters is None:
            with_adapters = self.step_graphs().prompt_adapters
        return PluginBatchDescriptor(**dataclasses.asdict(descriptor), prompt_adapters=with_adapters)

    def dispatch(self, num_tokens: int, uniform_decode: bool = False, has_lora: bool = False, num_active_loras: int = 0,
                 valid_modes=None, invalid_modes=None):
        if not self.step_graphs().full_graph:
            invalid_modes = vi.without_full_graphs(invalid_modes)
        return super().dispatch(num_tokens, uniform_decode, has_lora, num_active_loras, valid_modes, invalid_modes)
