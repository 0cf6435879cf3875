"""What every kernel that reads a layer's paged KV cache asks of its two views."""

from __future__ import annotations

import torch


def check_paged_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Keys and values (num_blocks, kv_heads, block_size, head_dim) must share their
    strides (one set of offsets serves both) and have a contiguous head_dim."""
    if key_cache.stride() != value_cache.stride() or key_cache.stride(3) != 1:
        raise ValueError("key and value caches need the same strides and contiguous head_dim")
