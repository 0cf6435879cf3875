"""vLLM's CPU model runner with the plugins (:class:`~.runner.PluginRunnerMixin`)."""

from __future__ import annotations

from vllm_plugins.serving.runner import PluginRunnerMixin
from vllm_plugins.serving.vllm_internals import CPUModelRunner


class PluginCPUModelRunner(PluginRunnerMixin, CPUModelRunner):
    pass
