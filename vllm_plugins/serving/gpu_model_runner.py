"""vLLM's V1 GPU model runner with the plugins (:class:`~.runner.PluginRunnerMixin`) and
their CUDA graphs (:mod:`.cuda_graphs`)."""

from __future__ import annotations

import torch

from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.cuda_graphs import PluginCudagraphDispatcher, StepGraphs
from vllm_plugins.serving.runner import PluginRunnerMixin


class PluginGPUModelRunner(PluginRunnerMixin, vi.GPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        self.cudagraph_dispatcher = PluginCudagraphDispatcher.for_runner(vllm_config, self.step_graphs)

    def step_graphs(self) -> StepGraphs:
        """What the step prepared (or the graph being captured) asks of the CUDA graphs."""
        metadata = self.prompt_aware.metadata
        host_work = metadata.pooling or self.kv_eviction.num_capture > 0
        return StepGraphs(prompt_adapters=any(metadata.acting),
                          full_graph=not (host_work or self.kv_eviction.narrowing))

    def _warmup_and_capture(self, desc, cudagraph_runtime_mode, profile_seq_lens=None, allow_microbatching=False,
                            num_warmups=None, profiler=None):
        """vLLM's warm-up and capture of the graph keyed ``desc``, with the prompt-aware
        kernels in it if its key says so."""
        with self.prompt_aware.metadata.capturing(desc.prompt_adapters):
            super()._warmup_and_capture(desc, cudagraph_runtime_mode, profile_seq_lens, allow_microbatching,
                                        num_warmups, profiler)
