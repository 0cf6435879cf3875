"""The harness's per-step inputs and its attention, over a paged KV cache.

:class:`StepInputs` holds what vLLM's model runner keeps in persistent buffers for one
step (token ids, positions, the slot each token's key/value is written to, and each
token's request's block table), written in place before each step, so a captured CUDA
graph reads the step it is replayed for.

:class:`PagedAttention` stands for vLLM's ``Attention`` layer. It holds the layer's cache
as vLLM 0.32's FlashAttention and Triton backends do by default, ``(num_blocks,
block_size, kv_heads, 2 * head_dim)`` with each token's key | value in the last
dimension, and the plugins reach it through the same views as in serving
(:func:`~vllm_plugins.serving.paged_cache.flash_layout_key_value`). It writes the step's keys/values into their slots and attends each token to its
request's cached tokens up to its own position: the blocks of its table are gathered and
attended with a masked softmax in float32. It is the base cost of every method alike, a
plain-torch stand-in for vLLM's paged attention kernels, not a copy of them.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_plugins.serving.paged_cache import flash_layout_key_value


class StepInputs:
    """One step's inputs for at most ``max_tokens`` tokens on ``device``: ``input_ids``,
    ``positions``, ``slot_mapping`` (tokens,) int64 and ``block_tables`` (tokens,
    max_blocks) int64, the blocks of each token's request (unused entries are never read:
    the mask stops at the token's position)."""

    def __init__(self, max_tokens: int, max_blocks: int, block_size: int, device: torch.device | str):
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_tokens, max_blocks, dtype=torch.int64, device=device)
        self.key_positions = torch.arange(max_blocks * block_size, device=device)  # position of each gathered key
        self.block_size = block_size

    def write(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> None:
        """The step's (tokens,) ids and positions and (tokens, blocks) tables, from the host;
        each token's slot follows from its position and table. ValueError if they do not fit."""
        n, blocks = block_tables.shape
        if n > self.input_ids.shape[0] or blocks > self.block_tables.shape[1]:
            raise ValueError(f"{n} tokens of {blocks} blocks do not fit buffers of {self.input_ids.shape[0]} tokens, "
                             f"{self.block_tables.shape[1]} blocks")
        block_of_token = block_tables.gather(1, (positions // self.block_size)[:, None])[:, 0]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = block_of_token * self.block_size + positions % self.block_size
        self.block_tables[:n, :blocks] = block_tables


class PagedAttention(nn.Module):
    """Causal attention of a step's tokens to their requests' paged caches (GQA)."""

    def __init__(self, inputs: StepInputs, num_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.inputs = inputs
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.kv_cache = torch.zeros(num_blocks, inputs.block_size, num_kv_heads, 2 * head_dim, dtype=dtype, device=device)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (tokens, heads * head_dim), key and value (tokens, kv_heads * head_dim),
        rotated where they should be -> (tokens, heads * head_dim)."""
        n = query.shape[0]
        inputs = self.inputs
        slots = inputs.slot_mapping[:n]
        d = self.head_dim
        cached = self.kv_cache.view(-1, self.num_kv_heads, 2 * d)  # (slots, kv_heads, key | value)
        cached[..., :d].index_copy_(0, slots, key.reshape(n, self.num_kv_heads, d).to(cached.dtype))
        cached[..., d:].index_copy_(0, slots, value.reshape(n, self.num_kv_heads, d).to(cached.dtype))
        gathered = self.kv_cache[inputs.block_tables[:n]].flatten(1, 2)  # (n, blocks * block_size, kv_heads, 2 * d)
        k, v = gathered[..., :d], gathered[..., d:]
        q = query.view(n, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        scores = torch.einsum("nkgd,nlkd->nkgl", q, k).float() * self.scale
        visible = inputs.key_positions[: k.shape[1]] <= inputs.positions[:n, None]  # (n, keys)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype)
        return torch.einsum("nkgl,nlkd->nkgd", probs, v).reshape(n, -1)


def cache_views(attn: PagedAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-major (keys, values) views (num_blocks, kv_heads, block_size, head_dim) of the
    layer's cache, what the plugins' methods read and write (their ``CacheViews``)."""
    return flash_layout_key_value(attn.kv_cache.transpose(1, 2))
