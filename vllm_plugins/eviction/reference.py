"""KV eviction on the transformers model: the reference the serving path is checked against.

One prompt at a time: prefill the whole prompt (its first generated token sees the whole
cache, as in vLLM), capture each layer's rotated queries of the prompt's last tokens
(for expected attention, their moments in the future frame, and the values' norms),
let the policy choose each (layer, KV head)'s kept tokens, keep only those keys and
values, in order, and decode on. Positions continue from the prompt's length (RoPE); the
cache holds the kept tokens only.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from vllm_plugins.eviction.budget import EvictionPlan
from vllm_plugins.eviction.policies import POLICIES, choose_kept
from vllm_plugins.eviction.query_moments import FutureFrame, QueryMoments, RopeTable
from vllm_plugins.training.generation import greedy_decode, prefill

CAPTURE = "vllm_plugins_query_capture"


@dataclass
class EvictedGeneration:
    tokens: list[int]
    kept: list[torch.Tensor]  # per layer, (kv_heads, num_kept) token indices; empty without eviction


@contextmanager
def _capture_queries(model, window: int, captured: dict[int, torch.Tensor]):
    """While active, each attention layer's last ``window`` rotated queries (heads, w, d)
    land in ``captured[layer_idx]``; attention itself runs unchanged."""
    original = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[original]

    def attention(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = query[0, :, query.shape[2] - window :].detach().clone()
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, attention)
    model.config._attn_implementation = CAPTURE
    try:
        yield
    finally:
        model.config._attn_implementation = original


def _base_model(lm) -> PreTrainedModel:
    """The transformers causal LM inside an adapter wrapper (PlainLM, PEFT, prompt-aware)."""
    for module in lm.modules():
        if isinstance(module, PreTrainedModel) and hasattr(getattr(module, "model", None), "layers"):
            return module
    raise ValueError("no transformers causal LM found inside the model")


def rope_table(model: PreTrainedModel) -> RopeTable:
    """The model's RoPE (transformers' Llama layout, "neox"): the angle of each rotation
    plane at each of its ``max_position_embeddings`` positions, radians (the table vLLM's
    rotary embedding holds)."""
    positions = torch.arange(model.config.max_position_embeddings)[None]
    probe = torch.empty(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(probe, positions)  # (1, positions, d): each plane's value twice
    half = cos.shape[-1] // 2
    return RopeTable.from_cos_sin(cos[0, :, :half], sin[0, :, :half])


def evict_cache(cache: DynamicCache, queries: dict[int, torch.Tensor], plan: EvictionPlan, scale: float,
                rope: RopeTable | None = None) -> list[torch.Tensor]:
    """Keep each layer's chosen tokens in ``cache`` (batch 1), in order; their indices,
    (kv_heads, num_kept) per layer. ``queries``: per layer, (heads, w, d), the prompt's
    last ``w`` rotated queries; ``rope``: :func:`rope_table`, for a policy that reads the
    queries' moments."""
    layers = cache.layers
    keys = torch.cat([layer.keys[0] for layer in layers])
    window = torch.cat([queries[i] for i in sorted(queries)]) if queries else keys.new_empty(0, 0, keys.shape[-1])
    kv_heads = layers[0].keys.shape[1]
    policy = POLICIES[plan.policy]
    moments = norms = None
    if policy.queries_as_moments:
        positions = torch.arange(plan.num_prompt - window.shape[1], plan.num_prompt)
        moments = QueryMoments.empty(window.shape[0], window.shape[2])
        moments.add(FutureFrame(rope, positions, plan.num_prompt)(window))
        window = window[:, :0]
    if policy.reads_value_norms:
        norms = torch.cat([layer.values[0] for layer in layers]).float().norm(dim=-1)
    kept = choose_kept(plan, keys, window, scale, kv_heads, moments, norms).view(len(layers), kv_heads, plan.num_kept)
    for layer, chosen in zip(layers, kept):
        rows = chosen[:, :, None].expand(-1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys[0].gather(1, rows)[None]
        layer.values = layer.values[0].gather(1, rows)[None]
    return list(kept)


def generate_with_eviction(lm, prompt: list[int], plan: EvictionPlan | None, max_new_tokens: int, eos_id: int | None) -> EvictedGeneration:
    """Greedy tokens of ``lm`` (any adapter wrapper with the project's calling convention)
    for one prompt, its cache evicted by ``plan`` after prefill (None: not evicted)."""
    model = _base_model(lm)
    queries: dict[int, torch.Tensor] = {}
    window = POLICIES[plan.policy]().query_window(len(prompt)) if plan else 0
    with _capture_queries(model, window, queries) if window else nullcontext():
        state = prefill(lm, [prompt], pad_id=0)
    kept: list[torch.Tensor] = []
    if plan is not None:
        rope = rope_table(model) if POLICIES[plan.policy].queries_as_moments else None
        kept = evict_cache(state.cache, queries, plan, model.model.layers[0].self_attn.scaling, rope)
        state.attention = torch.ones(1, state.cache.get_seq_length(), dtype=torch.long)
    return EvictedGeneration(greedy_decode(lm, state, max_new_tokens, eos_id)[0], kept)
