"""What the plugins' runner mixin does at ``load_model``, for the harness's stack: wrap its
layers with the plugins' layers, and give the custom ops a runtime.

:func:`build_stack` builds the stack and installs the plugins' layers once; a runtime
(:func:`bind_runtime`) can be replaced later, for another number of adapter slots, as a
fresh worker would allocate its tables.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_plugins.decode_harness.attention import StepInputs, cache_views
from vllm_plugins.decode_harness.model import ARCHITECTURE, LlamaStack, StackConfig
from vllm_plugins.eviction.query_moments import RopeTable
from vllm_plugins.serving import ops
from vllm_plugins.serving.adapter_slots import ReadAdapter
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.kv_eviction import KvEviction
from vllm_plugins.serving.layers import install_plugin_layers
from vllm_plugins.serving.methods import LayerModules
from vllm_plugins.serving.prompt_aware import PromptAwareRuntime


def build_stack(config: StackConfig, max_tokens: int, max_blocks: int, block_size: int, num_blocks: int,
                dtype: torch.dtype, device: torch.device | str, checkpoint: str | Path | None = None,
                seed: int = 0) -> tuple[LlamaStack, list[LayerModules]]:
    """A stack whose steps hold up to ``max_tokens`` tokens of requests up to ``max_blocks``
    KV blocks long, over ``num_blocks`` blocks of ``block_size`` tokens per layer, with the
    weights of a transformers ``checkpoint`` (or random ones from ``seed``) and then, as
    vLLM's runner loads the model before the plugins wrap it, the plugins' layers."""
    inputs = StepInputs(max_tokens, max_blocks, block_size, device)
    model = LlamaStack(config, inputs, num_blocks, dtype, device)
    if checkpoint is None:
        model.randomize(seed)
    else:
        model.load_checkpoint(checkpoint)
    return model, install_plugin_layers(model, ARCHITECTURE, config.dims, cache_views)


def bind_runtime(model: LlamaStack, layers: list[LayerModules], settings: PromptAdapterSettings, model_dir: str,
                 max_tokens: int, max_rows: int, device: torch.device | str, dtype: torch.dtype,
                 read_adapter: ReadAdapter | None = None) -> PromptAwareRuntime:
    """A prompt-aware runtime over ``model``'s plugin ``layers`` (and KV eviction beside
    it), bound to the plugins' ops as the worker binds its own; adapters are read from
    ``model_dir``'s snapshots unless ``read_adapter`` is given."""
    d = layers[0].dims
    runtime = PromptAwareRuntime(layers, settings, model_dir, max_tokens, max_rows, device, dtype, read_adapter)
    eviction = KvEviction(layers, d.head_dim**-0.5, RopeTable.from_angles(model.model.layers[0].self_attn.rotary.angles()),
                          layers[0].attn.inputs.block_size, d.num_heads, d.head_dim, max_tokens, max_rows, dtype, device)
    ops.bind(runtime, eviction)
    return runtime
