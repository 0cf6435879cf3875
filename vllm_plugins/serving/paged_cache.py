"""Where a cached token's key and value lie: token-major views of a layer's paged KV
cache on every vLLM 0.32 attention backend the plugins serve on, and nowhere else.

vLLM 0.32 hands each attention layer its cache as one tensor of logical shape
(num_blocks, kv_heads, block_size, 2 * head_dim), whose strides follow the engine's KV
cache layout (``vllm/v1/kv_cache_layout.py``: physically [block, slot, head, content] by
default on GPUs, [block, head, slot, content] on the CPU). The last dimension holds a
(block, KV head, slot)'s key and value, and the backends read it differently:

* ``FLASH_ATTN`` and ``TRITON_ATTN`` (:data:`FLASH_LAYOUT_BACKENDS`): the key is the first
  half of the last dimension and the value the second (``flash_attn.py`` and
  ``triton_attn.py`` split ``kv_cache.transpose(1, 2)`` at ``head_size`` on it);
  :func:`flash_layout_key_value`.
* ``CPU_ATTN``: each (block, KV head) is read as 2 * block_size rows of head_dim, the
  keys first and the values after them (``cpu_attn.py``), and inside the key half the
  ISA's kernel chooses the order: the ``vec`` kernels store keys dim-major (K
  transposed). vLLM's own cache-write op is asked once per layout where a token lands;
  :func:`cpu_layout_key_value`.

The plugins read, write and move single tokens, through views of the same memory of
shape (num_blocks, kv_heads, block_size, head_dim), strided as stored, with a contiguous
head_dim wherever vLLM stores one. Any other backend or layout is refused
(NotImplementedError) rather than misread, and so is a cache whose blocks are not the
scheduler's blocks (:func:`check_attention_backends`).

This module needs vLLM only for the CPU backend's probe and for reading a layer's
backend, so :func:`flash_layout_key_value` also serves harnesses that run without vLLM.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

CPU_BACKEND = "CPU_ATTN"
FLASH_LAYOUT_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")
"""vLLM's names (``AttentionBackend.get_name()``) of the GPU backends whose caches split
each token's content into key | value."""
SUPPORTED_BACKENDS = (CPU_BACKEND, *FLASH_LAYOUT_BACKENDS)


def check_attention_backends(names: Sequence[str], kernel_block_sizes: Sequence[int], block_size: int) -> None:
    """Refuse, before the first step, a model whose attention the plugins cannot address.

    ``names``: the attention backends of the model's layers; ``kernel_block_sizes``: the
    tokens per block of each KV cache group's tensors, which vLLM may make smaller than
    the scheduler's ``block_size`` (one scheduler block then spans several cache blocks).
    Raises NotImplementedError for another backend, ValueError for split blocks.
    """
    if unknown := sorted(set(names) - set(SUPPORTED_BACKENDS)):
        raise NotImplementedError(f"the plugins read the KV cache of the {', '.join(SUPPORTED_BACKENDS)} attention "
                                  f"backends; this model runs on {', '.join(unknown)}")
    if split := sorted({size for size in kernel_block_sizes if size != block_size}):
        raise ValueError(f"vLLM splits each KV block of {block_size} tokens into blocks of {split[0]} tokens for its "
                         f"attention kernels; the plugins address whole blocks: choose a --block-size the attention "
                         f"backend takes as it is")


def flash_layout_key_value(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of a FLASH_ATTN / TRITON_ATTN layer cache (num_blocks, kv_heads,
    block_size, 2 * head_dim), each (num_blocks, kv_heads, block_size, head_dim), the
    same strides for both and a contiguous head_dim. Raises NotImplementedError for a
    cache that is not so laid out."""
    if kv_cache.dim() != 4 or kv_cache.shape[3] % 2 or kv_cache.stride(3) != 1:
        raise NotImplementedError(f"a KV cache of shape {tuple(kv_cache.shape)} and strides {kv_cache.stride()} is not "
                                  f"in the flash layout (num_blocks, kv_heads, block_size, 2 * head_dim)")
    head_dim = kv_cache.shape[3] // 2
    return kv_cache[..., :head_dim], kv_cache[..., head_dim:]


def cpu_layout_key_value(kv_cache: torch.Tensor, keys_dim_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of a CPU_ATTN layer cache (num_blocks, kv_heads, block_size,
    2 * head_dim), each (num_blocks, kv_heads, block_size, head_dim); the keys strided
    (head_dim apart per slot) where the ISA stores them dim-major."""
    num_blocks, kv_heads, block_size, width = kv_cache.shape
    head_dim = width // 2
    keys, values = kv_cache.view(num_blocks, kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    if keys_dim_major:
        strides = (kv_cache.stride(0), kv_cache.stride(1), 1, block_size)
        keys = kv_cache.as_strided(keys.shape, strides, kv_cache.storage_offset())
    return keys, values


@functools.cache
def _keys_dim_major(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Write token t's key as the constant t through vLLM's CPU op, and see where it lands."""
    from vllm_plugins.serving import vllm_internals as vi  # see the module's last paragraph

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
    (num_blocks, kv_heads, block_size, head_dim) of the same memory. Raises
    NotImplementedError for a backend or layout the plugins do not know."""
    from vllm_plugins.serving import vllm_internals as vi  # see the module's last paragraph

    kv_cache, backend = vi.attention_cache(attn), vi.attention_backend_name(attn)
    if backend in FLASH_LAYOUT_BACKENDS:
        return flash_layout_key_value(kv_cache)
    if backend == CPU_BACKEND:
        _, _, block_size, width = kv_cache.shape
        return cpu_layout_key_value(kv_cache, _keys_dim_major(vi.attention_isa(attn), kv_cache.dtype, block_size, width // 2))
    raise NotImplementedError(f"the plugins read the KV cache of the {', '.join(SUPPORTED_BACKENDS)} attention backends, "
                              f"not {backend}")
