"""The plugins' side of a vLLM model runner, as a mixin over vLLM's V1 ``GPUModelRunner``
API: :class:`~.model_runner.PluginCPUModelRunner` combines it with vLLM's CPU runner (a
subclass of that API), :class:`~.gpu_model_runner.PluginGPUModelRunner` with the GPU
runner itself.

* at load: wrap the decoder's modules (:mod:`.layers`), preallocate the prompt-aware
  tables (:mod:`.prompt_aware`) and KV eviction's buffers (:mod:`.kv_eviction`) on the
  runner's device, bind them to the custom ops (:mod:`.ops`); once the attention
  metadata builders exist, refuse attention backends whose KV cache the plugins cannot
  address (:mod:`.paged_cache`) and make the builders build from KV eviction's narrowed
  metadata;
* each step, before the forward pass: evict the prompts the last step completed, and
  write the step's token -> request map into the persistent buffers; after it: set the
  step's captured queries aside for the next step, clear the map;
* finished and preempted requests give their state rows back;
* seeded requests' CPU generators can be rewound, as vLLM does after a step that
  sampled for an incomplete prompt, and prompt log-probabilities are computed under each
  request's own LoRA (:mod:`.vllm_fixes`).

Every access to vLLM internals goes through :mod:`.vllm_internals`.
"""

from __future__ import annotations

import numpy as np

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.eviction.query_moments import FUTURE_POSITIONS
from vllm_plugins.serving import ops, vllm_internals as vi
from vllm_plugins.serving.batch import StepBatch, requested_adapter
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.kv_eviction import KvEviction, requested_plan
from vllm_plugins.serving.layers import install_plugin_layers
from vllm_plugins.serving.paged_cache import check_attention_backends, paged_key_value
from vllm_plugins.serving.prompt_aware import PromptAwareRuntime
from vllm_plugins.serving.vllm_fixes import mark_seeded_generators, prompt_logprobs_per_request


class PluginRunnerMixin:
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        settings = PromptAdapterSettings.from_additional_config(self.vllm_config.additional_config)
        d = dims(self.model_config.hf_config)
        layers = install_plugin_layers(self.model, self.model_config.architecture, d, paged_key_value)
        self.prompt_aware = PromptAwareRuntime(layers, settings, self.model_config.model, self.max_num_tokens,
                                               self.max_num_reqs, self.device, self.model_config.dtype)
        # RoPE as far as a prompt's future positions reach: not the rotary's whole table
        rope = vi.rope_table(self.model, self.model_config.max_model_len + FUTURE_POSITIONS)
        self.kv_eviction = KvEviction(layers, vi.attention_scale(layers[0].attn), rope,
                                      self.cache_config.block_size, d.num_heads, d.head_dim, self.max_num_tokens,
                                      self.max_num_reqs, self.model_config.dtype, self.device)
        ops.bind(self.prompt_aware, self.kv_eviction)
        vi.separate_compile_cache(self.vllm_config)

    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes: list[int]) -> None:
        super().initialize_metadata_builders(kv_cache_config, kernel_block_sizes)
        check_attention_backends(vi.attention_backend_names(self), kernel_block_sizes, self.cache_config.block_size)
        vi.rewrite_attention_metadata(self, self.kv_eviction.narrow)

    def _update_states(self, scheduler_output):
        gone = vi.gone_requests(scheduler_output)
        self.prompt_aware.release(gone)
        # the last step's evictions: before vLLM's own update, which may zero or copy newly
        # allocated blocks (some of them freed by those evictions), and before the forward pass
        self.kv_eviction.finish_last_step(gone)
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        req_ids, num_computed = vi.step_requests(self)
        params = {req_id: vi.request_state(self, req_id).sampling_params for req_id in req_ids}
        num_prompt = [vi.request_state(self, req_id).num_prompt_tokens for req_id in req_ids]
        batch = StepBatch(list(req_ids), np.asarray(num_scheduled_tokens[: len(req_ids)], dtype=np.int64),
                          num_computed.astype(np.int64), np.array(num_prompt, dtype=np.int64))
        adapted = {req_id: p.extra_args for req_id, p in params.items() if requested_adapter(p) is not None}
        self.prompt_aware.begin_step(batch, adapted)
        self.kv_eviction.begin_step(batch, lambda req_id: requested_plan(params[req_id]))
        mark_seeded_generators(self)
        return result

    def _model_forward(self, *args, **kwargs):
        try:
            output = super()._model_forward(*args, **kwargs)
            self.kv_eviction.end_step(lambda req_id: vi.first_group_block_ids(self, req_id))
            return output
        finally:
            self.kv_eviction.clear()
            self.prompt_aware.end_step()

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        return prompt_logprobs_per_request(self, super()._get_prompt_logprobs_dict, hidden_states, num_scheduled_tokens)
