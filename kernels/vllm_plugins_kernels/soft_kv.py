"""IAPT's soft keys/values in the paged KV cache: the write at prefill and the soft
attention at every adapted token.

Each IAPT request owns ``n`` token slots of one KV block (``block``, slots ``first`` to
``first + n - 1``) in every layer's cache. Cache views are (num_blocks, kv_heads,
block_size, head_dim) with any strides but a contiguous last dimension, so the same code
reads vLLM's CPU layout and the GPU backends' layouts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_plugins.adapters.iapt.layer import soft_attention
from vllm_plugins_kernels.paged import check_paged_cache


def _soft_slots(first: torch.Tensor, num_soft: int) -> torch.Tensor:
    return first[:, None] + torch.arange(num_soft, device=first.device)


def write_soft_kv_torch(key_cache, value_cache, keys, values, blocks, first) -> None:
    slots = _soft_slots(first, keys.shape[1])
    key_cache[blocks[:, None], :, slots] = keys.to(key_cache.dtype)
    value_cache[blocks[:, None], :, slots] = values.to(value_cache.dtype)


@triton.jit
def _write_soft_kv_kernel(
    key_cache_ptr, value_cache_ptr, keys_ptr, values_ptr, blocks_ptr, first_ptr,
    cache_block_stride, cache_head_stride, cache_slot_stride,
    src_request_stride, src_token_stride, src_head_stride,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    j = tl.program_id(1)
    block = tl.load(blocks_ptr + r).to(tl.int64)
    slot = tl.load(first_ptr + r).to(tl.int64) + j
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)
    src = r * src_request_stride + j * src_token_stride + h[:, None] * src_head_stride + d[None, :]
    dst = block * cache_block_stride + h[:, None] * cache_head_stride + slot * cache_slot_stride + d[None, :]
    key = tl.load(keys_ptr + src, mask=mask)
    value = tl.load(values_ptr + src, mask=mask)
    tl.store(key_cache_ptr + dst, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_soft_kv_triton(key_cache, value_cache, keys, values, blocks, first) -> None:
    check_paged_cache(key_cache, value_cache)
    keys, values = keys.contiguous(), values.contiguous()
    requests, num_soft, kv_heads, head_dim = keys.shape
    if requests == 0:
        return
    _write_soft_kv_kernel[(requests, num_soft)](
        key_cache, value_cache, keys, values, blocks, first,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def write_soft_kv(key_cache, value_cache, keys, values, blocks, first) -> None:
    """Store each request's soft keys/values in its slots of a layer's cache.

    keys, values: (requests, n, kv_heads, head_dim); blocks, first: (requests,) each
    request's block and first slot.
    """
    impl = write_soft_kv_triton if key_cache.is_cuda else write_soft_kv_torch
    impl(key_cache, value_cache, keys, values, blocks, first)


def soft_attention_paged_torch(out, queries, index, rows, runs, key_cache, value_cache, max_soft, scale) -> None:
    acted = rows >= 0
    index = index[acted]
    blocks, first, counts = runs[rows[acted]].unbind(1)
    head_dim = key_cache.shape[-1]
    for count in counts.unique().tolist():
        chosen = counts == count
        slots = _soft_slots(first[chosen], count)
        keys = key_cache[blocks[chosen][:, None], :, slots].to(queries.dtype)  # (A, n, kv_heads, hd)
        values = value_cache[blocks[chosen][:, None], :, slots].to(queries.dtype)
        tokens = index[chosen]
        q = queries[tokens].view(len(tokens), 1, -1, head_dim)
        out[tokens] += soft_attention(q, keys, values, scale)[:, 0].reshape(len(tokens), -1)


@triton.jit
def _soft_attention_kernel(
    out_ptr, out_stride, q_ptr, q_stride, index_ptr, rows_ptr, runs_ptr, runs_stride,
    key_cache_ptr, value_cache_ptr, cache_block_stride, cache_head_stride, cache_slot_stride,
    group, head_dim, scale,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (token, KV head): if the token's row is not -1, its ``group`` query
    heads attend to its request's soft keys/values of that KV head (the row's run)."""
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(rows_ptr + t).to(tl.int64)
    if row >= 0:
        token = tl.load(index_ptr + t).to(tl.int64)
        block = tl.load(runs_ptr + row * runs_stride).to(tl.int64)
        first = tl.load(runs_ptr + row * runs_stride + 1).to(tl.int64)
        num_soft = tl.load(runs_ptr + row * runs_stride + 2).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        head_mask = (g[:, None] < group) & (d[None, :] < head_dim)
        kv_mask = (n[:, None] < num_soft) & (d[None, :] < head_dim)
        columns = (kv_head * group + g[:, None]) * head_dim + d[None, :]  # (G, D)
        out_ptrs = out_ptr + token * out_stride + columns
        # Every load is issued before any arithmetic, so their latencies overlap.
        q = tl.load(q_ptr + token * q_stride + columns, mask=head_mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptrs, mask=head_mask).to(tl.float32)
        kv = block * cache_block_stride + kv_head * cache_head_stride + (first + n[:, None]) * cache_slot_stride + d[None, :]
        k = tl.load(key_cache_ptr + kv, mask=kv_mask, other=0.0).to(tl.float32)  # (N, D)
        v = tl.load(value_cache_ptr + kv, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, N)
        s = tl.where(n[None, :] < num_soft, s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        o = tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (G, D)
        tl.store(out_ptrs, (out + o).to(out_ptr.dtype.element_ty), mask=head_mask)


def soft_attention_paged_triton(out, queries, index, rows, runs, key_cache, value_cache, max_soft, scale) -> None:
    check_paged_cache(key_cache, value_cache)
    if out.stride(1) != 1 or queries.stride(1) != 1 or runs.stride(1) != 1:
        raise ValueError("out, queries and runs need contiguous rows")
    if index.numel() == 0:
        return
    _, kv_heads, _, head_dim = key_cache.shape
    group = queries.shape[1] // (kv_heads * head_dim)
    _soft_attention_kernel[(index.numel(), kv_heads)](
        out, out.stride(0), queries, queries.stride(0), index, rows, runs, runs.stride(0),
        key_cache, value_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        group, head_dim, scale,
        BLOCK_N=triton.next_power_of_2(max_soft), BLOCK_G=triton.next_power_of_2(group),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1,
    )


def soft_attention_paged_(out, queries, index, rows, runs, key_cache, value_cache, max_soft: int, scale: float) -> None:
    """IAPT's soft-token term ``o_t += softmax(q_t K_s^T / sqrt(d_h)) V_s`` (see
    ``adapters/iapt/layer.py``), in place.

    out, queries: (tokens, heads * head_dim) the attention output and its rotated
    queries; index, rows: (A,) adapted tokens and their request's row of ``runs`` (-1:
    leave the token alone); runs: (requests, 3) int, each request's soft-token block,
    first slot and count (at most ``max_soft``).
    """
    impl = soft_attention_paged_triton if out.is_cuda else soft_attention_paged_torch
    impl(out, queries, index, rows, runs, key_cache, value_cache, max_soft, scale)
