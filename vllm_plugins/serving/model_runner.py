"""vLLM's CPU model runner with prompt-aware adapters and KV eviction.

Each step, before the forward pass, it tells the prompt-aware hooks which scheduled tokens
belong to which prompt-aware request (:mod:`.batch`), and the eviction hooks which belong
to requests with an eviction plan, narrowing evicted requests' attention to their kept
blocks (:mod:`.kv_eviction`). After the forward pass, the prompts completed in the step
are evicted and the block table is restored. Finished requests' states are dropped.
"""

from __future__ import annotations

import numpy as np
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.serving.adapter_cache import AdapterCache
from vllm_plugins.serving.batch import requested_adapter, step_slices
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.engine_hooks import PromptAwareHooks
from vllm_plugins.serving.kv_eviction import KvEvictionHooks, requested_plan


class PromptAwareCPUModelRunner(CPUModelRunner):
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        settings = PromptAdapterSettings.from_additional_config(self.vllm_config.additional_config)
        model_dims = dims(self.model_config.hf_config)
        cache = AdapterCache(self.model_config.model, model_dims, settings.max_active)
        self.prompt_aware = PromptAwareHooks(self.model, cache)
        self.kv_eviction = KvEvictionHooks(self.model, self.cache_config.block_size, model_dims.num_heads, model_dims.head_dim)

    def _update_states(self, scheduler_output) -> None:
        super()._update_states(scheduler_output)
        self.prompt_aware.drop(scheduler_output.finished_req_ids)
        self.kv_eviction.drop(scheduler_output.finished_req_ids)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        slices = step_slices(req_ids, num_scheduled_tokens, self.input_batch.num_computed_tokens_cpu,
                             lambda req_id: self.requests[req_id].num_prompt_tokens)
        params = {req_id: self.requests[req_id].sampling_params for req_id in req_ids}
        adapted = {s.req_id: params[s.req_id].extra_args for s in slices if requested_adapter(params[s.req_id]) is not None}
        self.prompt_aware.begin_step([s for s in slices if s.req_id in adapted], adapted)
        self.kv_eviction.begin_step(slices, lambda req_id: requested_plan(params[req_id]))
        self.kv_eviction.narrow_attention(req_ids, self._block_table, self.seq_lens, self.optimistic_seq_lens_cpu)
        return result

    @property
    def _block_table(self):
        return self.input_batch.block_table[0]

    def _block_ids(self, req_id: str) -> list[int]:
        return self.requests[req_id].block_ids[0]

    def _model_forward(self, *args, **kwargs):
        try:
            output = super()._model_forward(*args, **kwargs)
            self.kv_eviction.evict_completed(self._block_ids)
            return output
        finally:
            self.kv_eviction.restore_block_table(self._block_table, self._block_ids)
            self.prompt_aware.end_step()
