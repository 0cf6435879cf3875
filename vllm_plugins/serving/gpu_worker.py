"""``--worker-cls vllm_plugins.serving.gpu_worker.PromptAwareGPUWorker``: vLLM's GPU
worker running :class:`~vllm_plugins.serving.gpu_model_runner.PluginGPUModelRunner`, with
``VLLM_USE_V2_MODEL_RUNNER=0`` and ``--no-async-scheduling`` (``vllm-plugins serve`` sets
both; docs/serving.md says why)."""

from __future__ import annotations

from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.cuda_graphs import HOST_DRIVEN_OPS
from vllm_plugins.serving.gpu_model_runner import PluginGPUModelRunner
from vllm_plugins.serving.worker_mixin import PluginWorkerMixin
from vllm_plugins.vllm_version import require_supported_vllm


class PromptAwareGPUWorker(PluginWorkerMixin, vi.Worker):
    def _make_model_runner(self) -> PluginGPUModelRunner:
        """Called by vLLM's ``init_device`` once the device is set, before the model is
        loaded and compiled. Raises RuntimeError for settings the plugins cannot serve."""
        require_supported_vllm()
        self.check_plugin_settings()
        if vi.async_scheduling(self.vllm_config):
            raise RuntimeError("the plugins' scheduler (PromptAwareScheduler) schedules one step at a time: "
                               "serve with --no-async-scheduling")
        vi.add_splitting_ops(self.vllm_config, HOST_DRIVEN_OPS)
        return PluginGPUModelRunner(self.vllm_config, self.device)
