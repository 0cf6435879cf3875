"""``--worker-cls vllm_plugins.serving.worker.PromptAwareCPUWorker``: vLLM's CPU worker
running :class:`~vllm_plugins.serving.model_runner.PluginCPUModelRunner`."""

from __future__ import annotations

import torch

from vllm_plugins.serving.model_runner import PluginCPUModelRunner
from vllm_plugins.serving.vllm_internals import CPUWorker
from vllm_plugins.vllm_version import require_supported_vllm


class PromptAwareCPUWorker(CPUWorker):
    def init_device(self) -> None:
        require_supported_vllm()
        super().init_device()
        if self.use_v2_model_runner:
            raise RuntimeError("prompt-aware adapters need vLLM's V1 model runner (CPU builds without Triton use it)")
        if self.cache_config.cache_dtype != "auto":
            raise RuntimeError(
                f"prompt-aware adapters keep IAPT's soft keys/values in the KV cache in the model's dtype; "
                f"--kv-cache-dtype {self.cache_config.cache_dtype} is not supported (use auto)"
            )
        self.model_runner = PluginCPUModelRunner(self.vllm_config, torch.device("cpu"))

    def forward_hooks(self) -> int:
        """Forward hooks and pre-hooks on the served model's modules, global ones included
        (``collective_rpc("forward_hooks")``): the plugins install none."""
        from torch.nn.modules import module as torch_module

        hooks = len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)
        for m in self.model_runner.model.modules():
            hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
        return hooks

    def prompt_adapter_stats(self) -> dict[str, int]:
        """Counters for ``collective_rpc("prompt_adapter_stats")``: per-layer request states
        computed, requests holding a state row now, the most distinct adapters one step has
        served, and adapter weight loads."""
        runtime = self.model_runner.prompt_aware
        return {
            "state_computations": runtime.compute_state_calls,
            "requests_with_state": len(runtime.rows),
            "most_adapters_in_a_step": runtime.most_adapters_in_a_step,
            "adapter_loads": runtime.slots.loads,
        }

    def kv_eviction_stats(self) -> dict[str, int]:
        """Counters for ``collective_rpc("kv_eviction_stats")``: prompts evicted, and
        requests whose attention skips freed blocks now."""
        eviction = self.model_runner.kv_eviction
        return {"evictions": eviction.evictions, "evicted_requests": len(eviction.skipped_blocks)}

    def kv_eviction_kept(self) -> list[tuple[str, list[list[list[int]]]]]:
        """The most recent evictions' kept tokens: (request id, per layer, per KV head,
        ascending prompt positions), oldest first."""
        return [(req_id, [keep.tolist() for keep in kept]) for req_id, kept in self.model_runner.kv_eviction.kept_records]
