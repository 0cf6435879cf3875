"""``--worker-cls vllm_plugins.serving.worker.PromptAwareCPUWorker``: vLLM's CPU worker
running :class:`~vllm_plugins.serving.model_runner.PluginCPUModelRunner`."""

from __future__ import annotations

import torch

from vllm_plugins.serving.model_runner import PluginCPUModelRunner
from vllm_plugins.serving.vllm_internals import CPUWorker
from vllm_plugins.serving.worker_mixin import PluginWorkerMixin
from vllm_plugins.vllm_version import require_supported_vllm


class PromptAwareCPUWorker(PluginWorkerMixin, CPUWorker):
    def init_device(self) -> None:
        require_supported_vllm()
        super().init_device()
        self.check_plugin_settings()
        self.model_runner = PluginCPUModelRunner(self.vllm_config, torch.device("cpu"))
