"""Token-major views of a layer's paged KV cache on vLLM's CPU attention backend.

vLLM's CPU backend keeps a layer's cache as (num_blocks, kv_heads, block_size,
2 * head_dim) and splits each (block, KV head) into a key half and a value half
(``cpu_attn.py``). Inside the key half the ISA-specific kernel chooses the layout: the
``vec`` kernels store keys dim-major (K transposed). The plugins read, write and move
single tokens, so they ask vLLM's own cache-write op, once per layout, where a token's key
and value land, and view both halves token-major: (num_blocks, kv_heads, block_size,
head_dim), the keys strided where they are stored transposed. A layout that is neither
is refused rather than misread.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vllm_plugins.serving import vllm_internals as vi


@functools.cache
def _keys_dim_major(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Write token t's key as the constant t through vLLM's op, and see where it lands."""
    cache = torch.full((1, 1, 2 * block_size, head_dim), -1.0, dtype=dtype)
    key_half, value_half = cache.chunk(2, dim=2)
    token = torch.arange(block_size, dtype=dtype)[:, None, None].expand(block_size, 1, head_dim).contiguous()
    vi.cpu_reshape_and_cache(token, token, key_half, value_half, torch.arange(block_size), isa)
    token_major = token[:, 0]
    if not torch.equal(value_half[0, 0], token_major):
        raise NotImplementedError(f"vLLM's CPU KV cache layout for ISA {isa!r} stores values in a layout the plugins cannot read")
    if torch.equal(key_half[0, 0], token_major):
        return False
    if torch.equal(key_half[0, 0].reshape(head_dim, block_size), token_major.T):
        return True
    raise NotImplementedError(f"vLLM's CPU KV cache layout for ISA {isa!r} stores keys in a layout the plugins cannot read")


def paged_key_value(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of vLLM attention layer ``attn``'s cache, each a token-major view
    (num_blocks, kv_heads, block_size, head_dim) of the same memory."""
    kv_cache = vi.attention_cache(attn)
    num_blocks, kv_heads, block_size, width = kv_cache.shape
    head_dim = width // 2
    keys, values = kv_cache.view(num_blocks, kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    if _keys_dim_major(vi.attention_isa(attn), kv_cache.dtype, block_size, head_dim):
        strides = (kv_cache.stride(0), kv_cache.stride(1), 1, block_size)
        keys = kv_cache.as_strided(keys.shape, strides, kv_cache.storage_offset())
    return keys, values
