"""KV eviction at the end of prefill: the proxy-attention scores that rank a prompt's
cached tokens, and the compaction of the kept tokens into a request's leading slots.

Scores (NACL, Sec. 3: the attention that the proxy tokens P, the prompt's last tokens,
pay to every cached token), per request, KV head g and token j < n:

    score[g, j] = sum over query heads h of group g, sum over p in P of
                  softmax_j(q_{p,h} . k_{j,g} * scale)   (causal: j <= position of p)

Compaction (the paged-cache constraint in docs/eviction.md): every (request, KV head)
keeps the same number of tokens, its own choice of them, moved in order to the trailing
logical slots n - kept .. n - 1 of its prompt, so that the leading blocks hold nothing
still needed and can go back to the block pool; keys already carry their rotary
position, so they move as they are.

Caches are (num_blocks, kv_heads, block_size, head_dim) views of one layer, any strides
but a contiguous head_dim; ``block_table`` (requests, max_blocks) maps logical block i of
a request to its physical block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vllm_plugins_kernels.paged import check_paged_cache


def _gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One request's first ``length`` tokens, (length, kv_heads, head_dim)."""
    j = torch.arange(length, device=cache.device)
    block_size = cache.shape[2]
    return cache[block_table[j // block_size], :, j % block_size]


def proxy_attention_scores_torch(queries, key_cache, block_table, seq_lens, scale: float, max_len: int | None = None) -> torch.Tensor:
    requests, num_proxy, heads, _ = queries.shape
    kv_heads = key_cache.shape[1]
    max_len = int(seq_lens.max()) if max_len is None else max_len
    scores = torch.zeros(requests, kv_heads, max_len, dtype=torch.float32, device=queries.device)
    for r in range(requests):
        n = int(seq_lens[r])
        keys = _gather_tokens(key_cache, block_table[r], n).float().repeat_interleave(heads // kv_heads, dim=1)
        logits = torch.einsum("phd,jhd->hpj", queries[r].float(), keys) * scale
        position = n - num_proxy + torch.arange(num_proxy, device=queries.device)
        logits = logits.masked_fill(torch.arange(n, device=queries.device)[None, :] > position[:, None], float("-inf"))
        per_head = torch.softmax(logits, dim=-1).sum(dim=1)  # (heads, n)
        scores[r, :, :n] = per_head.view(kv_heads, -1, n).sum(dim=1)
    return scores


@triton.jit
def _load_keys(key_cache_ptr, table_ptr, j, kv_head, d, seq_len, head_dim, block_size,
               cache_block_stride, cache_head_stride, cache_slot_stride):
    """Keys of tokens j (BLOCK_N,) of one KV head, (BLOCK_N, BLOCK_D), zero where j >= seq_len."""
    valid = j < seq_len
    block = tl.load(table_ptr + j // block_size, mask=valid, other=0).to(tl.int64)
    ptrs = (key_cache_ptr + block[:, None] * cache_block_stride + kv_head * cache_head_stride
            + (j % block_size)[:, None] * cache_slot_stride + d[None, :])
    return tl.load(ptrs, mask=valid[:, None] & (d[None, :] < head_dim), other=0.0).to(tl.float32)


@triton.jit
def _load_queries(q_ptr, q_request_stride, q_proxy_stride, q_head_stride, r, h, p, d, num_proxy, head_dim):
    """Proxy queries of one head, (BLOCK_P, BLOCK_D) in float32."""
    ptrs = q_ptr + r * q_request_stride + p[:, None] * q_proxy_stride + h * q_head_stride + d[None, :]
    return tl.load(ptrs, mask=(p[:, None] < num_proxy) & (d[None, :] < head_dim), other=0.0).to(tl.float32)


@triton.jit
def _proxy_partial_lse_kernel(
    q_ptr, q_request_stride, q_proxy_stride, q_head_stride, key_cache_ptr, table_ptr, table_stride, seq_lens_ptr,
    partial_ptr, num_splits, cache_block_stride, cache_head_stride, cache_slot_stride,
    num_proxy, heads, group, head_dim, block_size, scale,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 1, one program per (request, query head, SPLIT tokens): each proxy query's
    running max and sum of exponentials of its logits over the tokens it sees there."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + r)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    q = _load_queries(q_ptr, q_request_stride, q_proxy_stride, q_head_stride, r, h, p, d, num_proxy, head_dim)
    position = seq_len - num_proxy + p
    running_max = tl.full((BLOCK_P,), -1e30, tl.float32)  # finite: an empty split leaves exp() at 0
    running_sum = tl.zeros((BLOCK_P,), tl.float32)
    for start in range(split * SPLIT, tl.minimum(split * SPLIT + SPLIT, seq_len), BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        k = _load_keys(key_cache_ptr, table_ptr + r * table_stride, j, h // group, d, seq_len, head_dim, block_size,
                       cache_block_stride, cache_head_stride, cache_slot_stride)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        logits = tl.where(j[None, :] <= position[:, None], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    out = partial_ptr + ((r * heads + h) * num_splits + split) * 2 * BLOCK_P + p
    tl.store(out, running_max)
    tl.store(out + BLOCK_P, running_sum)


@triton.jit
def _proxy_scores_kernel(
    q_ptr, q_request_stride, q_proxy_stride, q_head_stride, key_cache_ptr, table_ptr, table_stride, seq_lens_ptr,
    partial_ptr, num_splits, scores_ptr, scores_request_stride, scores_head_stride, cache_block_stride,
    cache_head_stride, cache_slot_stride, num_proxy, heads, group, head_dim, block_size, scale,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 2, one program per (request, KV head, block of tokens): the column sums of the
    normalised attention of the group's query heads, with each query's log-sum-exp merged
    from pass 1's splits."""
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + r)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(2) * BLOCK_N < seq_len:
        p = tl.arange(0, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        k = _load_keys(key_cache_ptr, table_ptr + r * table_stride, j, kv_head, d, seq_len, head_dim, block_size,
                       cache_block_stride, cache_head_stride, cache_slot_stride)
        position = seq_len - num_proxy + p
        seen = (j[None, :] <= position[:, None]) & (p[:, None] < num_proxy)
        total = tl.zeros((BLOCK_N,), tl.float32)
        for i in range(group):
            h = kv_head * group + i
            partial = partial_ptr + (r * heads + h) * num_splits * 2 * BLOCK_P + p
            lse_max = tl.full((BLOCK_P,), -1e30, tl.float32)
            lse_sum = tl.zeros((BLOCK_P,), tl.float32)
            for split in range(num_splits):
                split_max = tl.load(partial + split * 2 * BLOCK_P)
                split_sum = tl.load(partial + split * 2 * BLOCK_P + BLOCK_P)
                new_max = tl.maximum(lse_max, split_max)
                lse_sum = lse_sum * tl.exp(lse_max - new_max) + split_sum * tl.exp(split_max - new_max)
                lse_max = new_max
            lse = lse_max + tl.log(lse_sum)
            q = _load_queries(q_ptr, q_request_stride, q_proxy_stride, q_head_stride, r, h, p, d, num_proxy, head_dim)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            total += tl.sum(tl.where(seen, tl.exp(logits - lse[:, None]), 0.0), axis=0)
        tl.store(scores_ptr + r * scores_request_stride + kv_head * scores_head_stride + j, total, mask=j < seq_len)


KEYS_PER_SPLIT = 512


def proxy_attention_scores_triton(queries, key_cache, block_table, seq_lens, scale: float, max_len: int | None = None) -> torch.Tensor:
    if queries.stride(3) != 1 or key_cache.stride(3) != 1:
        raise ValueError("queries and the key cache need a contiguous head_dim")
    requests, num_proxy, heads, head_dim = queries.shape
    _, kv_heads, block_size, _ = key_cache.shape
    max_len = int(seq_lens.max()) if max_len is None else max_len
    block_p = max(16, triton.next_power_of_2(num_proxy))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64
    num_splits = triton.cdiv(max_len, KEYS_PER_SPLIT)
    # Operands go to the dot product in float32: exact products for 16-bit inputs under
    # TF32 (10 mantissa bits hold bfloat16's 7 and half's 10), full float32 otherwise.
    precision = "ieee" if queries.dtype == torch.float32 else "tf32"
    partial = torch.empty(requests, heads, num_splits, 2, block_p, dtype=torch.float32, device=queries.device)
    scores = torch.zeros(requests, kv_heads, max_len, dtype=torch.float32, device=queries.device)
    common = (num_proxy, heads, heads // kv_heads, head_dim, block_size, scale)
    q_strides = (queries.stride(0), queries.stride(1), queries.stride(2))
    cache_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2))
    blocks = dict(BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision)
    _proxy_partial_lse_kernel[(requests, heads, num_splits)](
        queries, *q_strides, key_cache, block_table, block_table.stride(0), seq_lens, partial, num_splits,
        *cache_strides, *common, SPLIT=KEYS_PER_SPLIT, **blocks,
    )
    _proxy_scores_kernel[(requests, kv_heads, triton.cdiv(max_len, block_n))](
        queries, *q_strides, key_cache, block_table, block_table.stride(0), seq_lens, partial, num_splits,
        scores, scores.stride(0), scores.stride(1), *cache_strides, *common, **blocks,
    )
    return scores


def proxy_attention_scores(queries, key_cache, block_table, seq_lens, scale: float, max_len: int | None = None) -> torch.Tensor:
    """Scores (requests, kv_heads, max_len) float32, zero past each request's length.

    queries: (requests, P, heads, head_dim) the rotated queries of each request's last P
    prompt tokens (positions seq_len - P .. seq_len - 1); seq_lens: (requests,);
    max_len: max(seq_lens) if the caller knows it (saves reading it back from the device).
    """
    impl = proxy_attention_scores_triton if queries.is_cuda else proxy_attention_scores_torch
    return impl(queries, key_cache, block_table, seq_lens, scale, max_len)


def compact_kept_torch(key_cache, value_cache, block_table, keep, seq_lens) -> None:
    block_size = key_cache.shape[2]
    heads = torch.arange(keep.shape[1], device=keep.device)[:, None]
    kept = torch.arange(keep.shape[2], device=keep.device)[None, :]
    for r in range(keep.shape[0]):
        table = block_table[r]
        dst = int(seq_lens[r]) - keep.shape[2] + kept
        src_block, src_slot = table[keep[r] // block_size], keep[r] % block_size
        dst_block, dst_slot = table[dst // block_size], dst % block_size
        for cache in (key_cache, value_cache):
            cache[dst_block, heads, dst_slot] = cache[src_block, heads, src_slot].clone()


@triton.jit
def _compact_kernel(
    key_cache_ptr, value_cache_ptr, table_ptr, table_stride, keep_ptr, keep_request_stride, keep_head_stride,
    seq_lens_ptr, cache_block_stride, cache_head_stride, cache_slot_stride, num_kept, head_dim, block_size,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (request, KV head), moving its kept tokens in descending chunks.

    In place without a race: keep is ascending and ends below seq_len, so kept token i
    moves right or stays (keep[i] <= seq_len - num_kept + i = dst[i]). Chunk c writes
    slots dst[c * BLOCK_K ..], which no later (lower) chunk reads (its sources are
    keep[i] <= dst[i] < dst[c * BLOCK_K]); within a chunk every load precedes every store.
    """
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    table = table_ptr + r * table_stride
    first_dst = tl.load(seq_lens_ptr + r) - num_kept
    d = tl.arange(0, BLOCK_D)
    head = kv_head * cache_head_stride + d[None, :]
    for chunk in range(tl.cdiv(num_kept, BLOCK_K) - 1, -1, -1):
        i = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = i < num_kept
        mask = valid[:, None] & (d[None, :] < head_dim)
        src = tl.load(keep_ptr + r * keep_request_stride + kv_head * keep_head_stride + i, mask=valid, other=0)
        dst = first_dst + i
        src_block = tl.load(table + src // block_size, mask=valid, other=0).to(tl.int64)
        dst_block = tl.load(table + dst // block_size, mask=valid, other=0).to(tl.int64)
        src_off = src_block[:, None] * cache_block_stride + (src % block_size)[:, None] * cache_slot_stride + head
        dst_off = dst_block[:, None] * cache_block_stride + (dst % block_size)[:, None] * cache_slot_stride + head
        key = tl.load(key_cache_ptr + src_off, mask=mask)
        value = tl.load(value_cache_ptr + src_off, mask=mask)
        tl.debug_barrier()
        tl.store(key_cache_ptr + dst_off, key, mask=mask)
        tl.store(value_cache_ptr + dst_off, value, mask=mask)


def compact_kept_triton(key_cache, value_cache, block_table, keep, seq_lens) -> None:
    check_paged_cache(key_cache, value_cache)
    if keep.stride(2) != 1:
        raise ValueError("keep needs contiguous rows")
    requests, kv_heads, num_kept = keep.shape
    if requests == 0 or num_kept == 0:
        return
    _, _, block_size, head_dim = key_cache.shape
    _compact_kernel[(requests, kv_heads)](
        key_cache, value_cache, block_table, block_table.stride(0), keep, keep.stride(0), keep.stride(1), seq_lens,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), num_kept, head_dim, block_size,
        BLOCK_K=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )


def compact_kept_(key_cache, value_cache, block_table, keep, seq_lens) -> None:
    """Move each (request, KV head)'s kept tokens, in order, to the trailing slots
    ``seq_len - kept .. seq_len - 1`` of its prompt, in place.

    keep: (requests, kv_heads, kept) ascending logical token indices below the request's
    seq_len, the same count for every head (the paged-cache constraint); seq_lens:
    (requests,) each request's prompt length.
    """
    if key_cache.is_cuda:
        compact_kept_triton(key_cache, value_cache, block_table, keep, seq_lens)
    elif key_cache.device.type == "cpu":
        # imported here: numba adds half a second to the start-up of every process that
        # imports the kernels, most of which never evict
        from vllm_plugins_kernels.eviction_cpu import compact_kept_cpu

        compact_kept_cpu(key_cache, value_cache, block_table, keep, seq_lens)
    else:
        compact_kept_torch(key_cache, value_cache, block_table, keep, seq_lens)


def compact_kept_layers_(caches: Sequence[tuple[torch.Tensor, torch.Tensor]], block_table, keep, seq_lens) -> None:
    """:func:`compact_kept_` for every layer of a model at once: ``caches``, per layer,
    its (key_cache, value_cache); keep: (layers, requests, kv_heads, kept). On CPU tensors
    one compiled call moves every layer's tokens, in a parallel loop over the layers."""
    if caches and caches[0][0].device.type == "cpu":
        from vllm_plugins_kernels.eviction_cpu import compact_kept_layers_cpu

        compact_kept_layers_cpu(caches, block_table, keep, seq_lens)
        return
    for (key_cache, value_cache), layer_keep in zip(caches, keep):
        compact_kept_(key_cache, value_cache, block_table, layer_keep, seq_lens)
