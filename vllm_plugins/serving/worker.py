"""``--worker-cls vllm_plugins.serving.worker.PromptAwareCPUWorker``: vLLM's CPU worker
running :class:`~vllm_plugins.serving.model_runner.PluginCPUModelRunner`."""

from __future__ import annotations

import logging

import torch

from vllm_plugins.serving import openmp
from vllm_plugins.serving.model_runner import PluginCPUModelRunner
from vllm_plugins.serving.vllm_internals import CPUWorker
from vllm_plugins.serving.worker_mixin import PluginWorkerMixin
from vllm_plugins.vllm_version import require_supported_vllm

logger = logging.getLogger(__name__)


class PromptAwareCPUWorker(PluginWorkerMixin, CPUWorker):
    def init_device(self) -> None:
        require_supported_vllm()
        super().init_device()
        self.check_plugin_settings()
        if (unset := openmp.spin_environment()) and not openmp.intel_openmp_loaded():
            logger.info("GNU OpenMP's threads busy-wait for milliseconds after each parallel region (300,000 spins by "
                        "default), which slows KV eviction's loops; start the server with %s (vllm-plugins serve does)",
                        " ".join(f"{k}={v}" for k, v in unset.items()))
        self.model_runner = PluginCPUModelRunner(self.vllm_config, torch.device("cpu"))
