"""Every place the plugins touch vLLM beyond its documented plugin interfaces, in one
module, for vLLM 0.32.0 only (:data:`~vllm_plugins.vllm_version.SUPPORTED_VLLM`).

vLLM's internals are not a stable API. The rest of the package reaches them through the
names below and nowhere else, and ``tests/test_vllm_internals.py`` checks each of them
against the installed vLLM: every class subclassed, every method overridden (with its
parameters), every private attribute read or written. Another vLLM version is refused at
start-up (:func:`~vllm_plugins.vllm_version.require_supported_vllm`).

The plugins' runner mixin, workers, scheduler and CUDA graph dispatcher subclass vLLM's
classes and read the attributes listed in :data:`ATTRIBUTES` on ``self``; everything else
goes through the functions below. Documented interfaces the plugins also use, not listed
here: the ``vllm.general_plugins`` entry point, ``--worker-cls``, ``--scheduler-cls``,
``--middleware``, ``--additional-config``, ``SamplingParams.extra_args`` and
``LLM.collective_rpc``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Iterator

import numpy as np
import torch

# -- classes the plugins subclass --------------------------------------------------------
from vllm.config import CUDAGraphMode  # the graph kinds the dispatcher chooses from
from vllm.forward_context import BatchDescriptor  # PluginBatchDescriptor
from vllm.v1.core.sched.scheduler import Scheduler  # PromptAwareScheduler
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher  # PluginCudagraphDispatcher
from vllm.v1.kv_cache_interface import FullAttentionSpec  # KV eviction needs it alone
from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # PluginCPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker  # PromptAwareCPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the runner mixin's API; PluginGPUModelRunner
from vllm.v1.worker.gpu_worker import Worker  # vLLM's GPU worker; PromptAwareGPUWorker

from vllm_plugins.vllm_version import SUPPORTED_VLLM

PINNED = SUPPORTED_VLLM

SUBCLASSED = (Scheduler, CPUModelRunner, CPUWorker, GPUModelRunner, Worker, CudagraphDispatcher, BatchDescriptor)
"""vLLM's classes the plugins subclass."""

OVERRIDDEN: dict[type, dict[str, tuple[str, ...]]] = {
    # class -> method -> its parameters (self first) as the plugins call and override it
    GPUModelRunner: {
        "__init__": ("self", "vllm_config", "device"),
        "load_model": ("self", "load_dummy_weights", "model"),
        "initialize_metadata_builders": ("self", "kv_cache_config", "kernel_block_sizes"),
        "_update_states": ("self", "scheduler_output"),
        "_prepare_inputs": ("self", "scheduler_output", "num_scheduled_tokens"),
        "_model_forward": ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "model_kwargs"),
        "_get_prompt_logprobs_dict": ("self", "hidden_states", "num_scheduled_tokens"),
        "_warmup_and_capture": ("self", "desc", "cudagraph_runtime_mode", "profile_seq_lens", "allow_microbatching",
                                "num_warmups", "profiler"),
    },
    CPUModelRunner: {"load_model": ("self", "load_dummy_weights")},
    CPUWorker: {"init_device": ("self",)},
    Worker: {"_make_model_runner": ("self",)},
    CudagraphDispatcher: {
        "initialize_cudagraph_keys": ("self", "cudagraph_mode", "uniform_decode_query_len"),
        "_create_padded_batch_descriptor": ("self", "num_tokens", "uniform_decode", "has_lora", "num_active_loras"),
        "dispatch": ("self", "num_tokens", "uniform_decode", "has_lora", "num_active_loras", "valid_modes",
                     "invalid_modes"),
    },
    Scheduler: {
        "add_request": ("self", "request"),
        "update_from_output": ("self", "scheduler_output", "model_runner_output"),
        "_handle_blocked_waiting_request": ("self", "request"),
        "_free_request": ("self", "request", "delay_free_blocks"),
        "_mamba_block_aligned_split": (
            "self", "request", "num_new_tokens", "num_new_local_computed_tokens", "num_external_computed_tokens",
        ),
    },
}
"""Read by the contract test; the plugins' overrides keep these signatures."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    # the class or module that owns them -> attributes the plugins read or write
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner": ("model", "model_config", "cache_config", "vllm_config", "requests", "input_batch", "attn_groups",
                       "max_num_tokens", "max_num_reqs", "lora_config", "num_prompt_logprobs", "query_start_loc",
                       "device", "cudagraph_dispatcher"),
    "vllm.v1.worker.lora_model_runner_mixin.LoRAModelRunnerMixin": ("lora_manager",),
    "vllm.lora.worker_manager.WorkerLoRAManager": ("_adapter_manager",),
    "vllm.lora.model_manager.LoRAModelManager": ("punica_wrapper_mapping",),
    "vllm.lora.model_manager": ("DEFAULT_LANGUAGE_WRAPPER_KEY",),
    "vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase": ("_token_lora_indices", "_sampler_indices", "indices_len"),
    "vllm.v1.worker.gpu_input_batch.InputBatch": ("req_ids", "num_reqs", "num_computed_tokens_cpu", "generators",
                                                  "req_id_to_index"),
    "vllm.v1.worker.gpu_input_batch.CachedRequestState": ("num_prompt_tokens", "sampling_params", "block_ids", "generator"),
    "vllm.v1.worker.utils.AttentionGroup": ("metadata_builders", "backend"),
    "vllm.v1.attention.backend.AttentionBackend": ("get_name",),
    "vllm.v1.attention.backend.CommonAttentionMetadata": ("num_reqs", "block_table_tensor", "seq_lens",
                                                          "_num_computed_tokens_cache"),
    "vllm.v1.core.sched.output.SchedulerOutput": ("finished_req_ids", "preempted_req_ids", "num_scheduled_tokens"),
    "vllm.v1.core.sched.scheduler.Scheduler": ("kv_cache_manager", "block_size", "running", "requests", "need_mamba_block_aligned_split"),
    "vllm.v1.core.kv_cache_manager.KVCacheManager": ("kv_cache_config", "coordinator", "block_pool"),
    "vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager": ("req_to_blocks", "_remove_blocks_in_range"),
    "vllm.v1.request.Request": ("request_id", "sampling_params", "num_prompt_tokens", "num_computed_tokens", "skip_reading_prefix_cache",
                "cache_salt", "block_hashes", "update_block_hashes"),
    "vllm.model_executor.layers.attention.attention.Attention": ("kv_cache", "impl", "attn_backend"),
    "vllm.model_executor.layers.linear.LinearBase": ("quant_method",),
    "vllm.model_executor.models.llama.LlamaAttention": ("rotary_emb",),
    "vllm.model_executor.models.qwen2.Qwen2Attention": ("rotary_emb",),
    "vllm.model_executor.layers.rotary_embedding.base.RotaryEmbeddingBase": ("is_neox_style", "_compute_cos_sin_cache"),
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionMetadataBuilder": ("isa",),  # it sets Attention.isa
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl": ("scale",),  # Attention.impl
    "vllm.config.vllm.VllmConfig": ("additional_config", "model_config", "compilation_config", "scheduler_config"),
    "vllm.config.compilation.CompilationConfig": ("splitting_ops",),
    "vllm.envs": ("disable_envs_cache",),
    "vllm.config.scheduler.SchedulerConfig": ("async_scheduling",),
    "vllm.forward_context.BatchDescriptor": ("num_tokens", "num_reqs", "uniform", "has_lora", "num_active_loras"),
    "vllm.entrypoints.llm.LLM": ("llm_engine",),
    "vllm.v1.engine.llm_engine.LLMEngine": ("engine_core",),
    "vllm.v1.engine.core_client.EngineCoreClient": ("shutdown",),
    "vllm.v1.worker.cpu_worker.CPUWorker": ("use_v2_model_runner", "cache_config", "vllm_config", "model_runner"),
    "vllm.v1.worker.gpu_worker.Worker": ("use_v2_model_runner", "cache_config", "vllm_config", "model_runner", "device"),
    "vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator": ("single_type_managers",),
    "vllm.v1.core.block_pool.BlockPool": ("get_num_free_blocks", "get_new_blocks", "free_blocks"),
    "vllm.v1.core.kv_cache_utils.KVCacheBlock": ("block_id", "is_null"),
    "vllm.v1.kv_cache_interface.KVCacheConfig": ("kv_cache_groups",),
    "vllm.v1.kv_cache_interface.KVCacheGroupSpec": ("kv_cache_spec",),
    "vllm.config.model.ModelConfig": ("model", "hf_config", "architecture", "dtype", "max_model_len"),
    "vllm.config.cache.CacheConfig": ("block_size", "cache_dtype"),
    "vllm._custom_ops": ("cpu_attn_reshape_and_cache",),
    "vllm.lora.punica_wrapper.punica_cpu": ("bgmv_shrink", "sgmv_shrink"),
    "vllm.platforms.interface.Platform": ("register_triton_kernel_overrides", "device_type"),
}
"""Attributes by the class or module that owns them (dotted path); the contract test finds
each on the class, among its dataclass fields, or assigned in its source."""


# -- model runner ------------------------------------------------------------------------
def step_requests(runner) -> tuple[list[str], np.ndarray]:
    """The step's request ids in batch-row order and their computed-token counts before
    the step (each row's first scheduled position)."""
    batch = runner.input_batch
    return batch.req_ids[: batch.num_reqs], batch.num_computed_tokens_cpu[: batch.num_reqs]


def request_state(runner, req_id: str):
    """vLLM's ``CachedRequestState`` of a request: ``num_prompt_tokens``,
    ``sampling_params``, ``block_ids``."""
    return runner.requests[req_id]


def seeded_generators(runner) -> dict[int, torch.Generator]:
    """The step's seeded requests' generators by batch row (``InputBatch.generators``),
    the same objects as their ``CachedRequestState.generator``."""
    return runner.input_batch.generators


def replace_generator(runner, row: int, generator: torch.Generator) -> None:
    """Give the request in batch row ``row`` another generator, in the batch and in its
    cached state (which vLLM puts back in the batch when the request resumes)."""
    runner.input_batch.generators[row] = generator
    runner.requests[runner.input_batch.req_ids[row]].generator = generator


@contextlib.contextmanager
def logits_lora_of_request(runner, req_id: str) -> Iterator[None]:
    """While open, vLLM's LoRA logits processor applies request ``req_id``'s LoRA (or none)
    to every row it is given, instead of the step's one LoRA index per request.

    The index is the one of the request's first token in this step (its rows all share
    it); the step's indices are put back on exit."""
    from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY

    punica = runner.lora_manager._adapter_manager.punica_wrapper_mapping[DEFAULT_LANGUAGE_WRAPPER_KEY]
    first_token = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
    count = punica.indices_len[1]
    saved = punica._sampler_indices[:count].clone()
    punica._sampler_indices[0] = punica._token_lora_indices[first_token]
    punica.indices_len[1] = 1
    try:
        yield
    finally:
        punica._sampler_indices[:count] = saved
        punica.indices_len[1] = count


def first_group_block_ids(runner, req_id: str) -> list[int]:
    return runner.requests[req_id].block_ids[0]


def attention_backend_names(runner) -> list[str]:
    """vLLM's names of the attention backends of ``runner``'s KV cache groups
    (``AttentionBackend.get_name()``: "CPU_ATTN", "FLASH_ATTN", ...)."""
    return [group.backend.get_name() for groups in runner.attn_groups for group in groups]


COMPILE_CACHE_MARK = "vllm_plugins_layers"


def separate_compile_cache(vllm_config) -> None:
    """Give the wrapped model a compile-cache key of its own.

    vLLM keys its cache of compiled forwards (``~/.cache/vllm/torch_compile_cache``) by a
    hash of the config that leaves ``--worker-cls`` out, so a plain engine and a plugin
    engine of the same model would load each other's graph: the plugin engine would then
    run without its layers and answer as the base model. ``additional_config`` enters the
    hash; the mark is set before the first forward, when vLLM computes the key.
    """
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), COMPILE_CACHE_MARK: True}


def gone_requests(scheduler_output) -> set[str]:
    """Requests that finished or were preempted before this step."""
    return set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())


def rewrite_attention_metadata(runner, narrow: Callable) -> None:
    """Make every attention metadata builder of ``runner`` build from vLLM's common
    metadata (``CommonAttentionMetadata``) narrowed by ``narrow(num_reqs, block_table,
    seq_lens) -> (block_table, seq_lens) | None`` (None: unchanged): the place vLLM builds
    each step's metadata. A narrowed copy has its cache of computed tokens (derived from
    seq_lens) reset."""

    def rewrite(metadata):
        narrowed = narrow(metadata.num_reqs, metadata.block_table_tensor, metadata.seq_lens)
        if narrowed is None:
            return metadata
        block_table, seq_lens = narrowed
        return dataclasses.replace(metadata, block_table_tensor=block_table, seq_lens=seq_lens,
                                   _num_computed_tokens_cache=None)

    for groups in runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                build = builder.build

                @functools.wraps(build)
                def rewritten(common_prefix_len, common_attn_metadata, *args, _build=build, **kwargs):
                    return _build(common_prefix_len, rewrite(common_attn_metadata), *args, **kwargs)

                builder.build = rewritten


# -- configuration -----------------------------------------------------------------------
def add_splitting_ops(vllm_config, ops: tuple[str, ...]) -> None:
    """Make ``ops`` graph-splitting ops (run eagerly between the pieces of piecewise CUDA
    graphs, as attention is) if vLLM compiles piecewise, i.e. has splitting ops at all.
    Called before the model is compiled."""
    splitting_ops = vllm_config.compilation_config.splitting_ops
    if splitting_ops:
        splitting_ops.extend(op for op in ops if op not in splitting_ops)


def without_full_graphs(invalid_modes) -> set:
    """A dispatch's excluded CUDA graph modes (vLLM's ``CUDAGraphMode``), full graphs added."""
    return {*(invalid_modes or ()), CUDAGraphMode.FULL}


def async_scheduling(vllm_config) -> bool:
    return bool(vllm_config.scheduler_config.async_scheduling)


# -- scheduler ---------------------------------------------------------------------------
def full_attention_manager(kv_cache_manager):
    """The single-type manager of a model whose layers all use full attention, or None."""
    groups = kv_cache_manager.kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
        return None
    return kv_cache_manager.coordinator.single_type_managers[0]


def free_leading_blocks(manager, req_id: str, num_blocks: int) -> None:
    """Give a running request's first ``num_blocks`` blocks back to the pool; they become
    ``null_block`` in its block list (vLLM's sliding-window mechanism)."""
    manager._remove_blocks_in_range(req_id, 0, num_blocks)


def blocks_held(manager, req_id: str) -> int:
    return sum(not block.is_null for block in manager.req_to_blocks.get(req_id, ()))


def max_model_len(app_state) -> int:
    """The served model's context length, from the API server's ``app.state.vllm_config``
    (set by vLLM's ``init_app_state``)."""
    return app_state.vllm_config.model_config.max_model_len


def rehash_with_salt(request, salt: str) -> None:
    """Hash a request's blocks under ``salt`` from now on, and never read cached blocks."""
    request.skip_reading_prefix_cache = True
    request.cache_salt = salt
    request.block_hashes = []
    request.update_block_hashes()


# -- attention layers and caches ---------------------------------------------------------
def attention_cache(attn) -> torch.Tensor:
    """The layer's paged KV cache, (num_blocks, kv_heads, block_size, 2 * head_dim) in
    logical order (:mod:`.paged_cache` reads it)."""
    return attn.kv_cache


def attention_backend_name(attn) -> str:
    """vLLM's name of the attention layer's backend ("CPU_ATTN", "FLASH_ATTN", ...)."""
    return attn.attn_backend.get_name()


def attention_isa(attn) -> str:
    return attn.isa


def attention_scale(attn) -> float:
    return attn.impl.scale


def rope_table(model, positions: int):
    """The model's RoPE as its first decoder layer's rotary embedding applies it (a
    :class:`~vllm_plugins.eviction.query_moments.RopeTable`): the cosine and sine of each
    rotation plane at the first ``positions`` positions of its table (float32), and its
    layout."""
    from vllm_plugins.eviction.query_moments import RopeTable

    rotary = model.model.layers[0].self_attn.rotary_emb
    cos, sin = rotary._compute_cos_sin_cache()[:positions].chunk(2, dim=-1)  # float32 (positions, rotary_dim): cos | sin
    return RopeTable.from_cos_sin(cos, sin, interleaved=not rotary.is_neox_style)


def cpu_reshape_and_cache(key, value, key_cache, value_cache, slots, isa) -> None:
    from vllm import _custom_ops

    _custom_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


# -- offline engines ---------------------------------------------------------------------
def shutdown_engine(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core now, in its process or in this one (``LLM`` has
    no public close). Its shutdown also tears down vLLM's distributed state in this
    process, which an engine core running here still needs."""
    llm.llm_engine.engine_core.shutdown()


def reset_envs_cache() -> None:
    """An engine core started in this process caches vLLM's environment variables for
    the life of the process (``vllm.envs.enable_envs_cache``): undo that, so that a later
    engine reads them again."""
    from vllm import envs

    envs.disable_envs_cache()


# -- modules the fixes of vllm_fixes.py patch --------------------------------------------
def cpu_punica_ops():
    """vLLM's CPU punica module, whose ``bgmv_shrink`` / ``sgmv_shrink`` the LoRA fix wraps."""
    from vllm.lora.punica_wrapper import punica_cpu

    return punica_cpu


def platform():
    """vLLM's current platform: its ``device_type`` decides whether ``serve`` starts, and
    the llvmlite fix wraps its ``register_triton_kernel_overrides``."""
    from vllm.platforms import current_platform

    return current_platform
