"""What both plugin workers (:mod:`.worker` on vLLM's CPU platform, :mod:`.gpu_worker` on
CUDA) add to vLLM's: the start-up checks of the settings the plugins cannot serve, and the
RPCs the tests and benchmarks read (``LLM.collective_rpc``)."""

from __future__ import annotations


class PluginWorkerMixin:
    def check_plugin_settings(self) -> None:
        """Raise RuntimeError for Model Runner V2, a quantised KV cache, or a setting that
        keeps or moves KV cache the plugins never see: speculative decoding (a drafter's
        own cache is neither evicted nor narrowed, and it runs without the adapters), a
        KV connector (it would transfer blocks that eviction rewrites) or pipeline
        parallelism (untested: each stage would evict its own layers)."""
        refused = {
            "speculative decoding": self.speculative_config is not None,
            "a KV transfer connector (--kv-transfer-config)": self.kv_transfer_config is not None,
            "pipeline parallelism": self.parallel_config.pipeline_parallel_size > 1,
        }
        for setting, present in refused.items():
            if present:
                raise RuntimeError(f"the plugins do not support {setting}: serve without it")
        if self.use_v2_model_runner:
            raise RuntimeError("prompt-aware adapters need vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0 "
                               "(vllm-plugins serve does; CPU builds without Triton use V1)")
        if self.cache_config.cache_dtype != "auto":
            raise RuntimeError(
                f"prompt-aware adapters keep IAPT's soft keys/values in the KV cache in the model's dtype; "
                f"--kv-cache-dtype {self.cache_config.cache_dtype} is not supported (use auto)"
            )

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
