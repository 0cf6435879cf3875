"""Each Triton kernel against its torch reference, in Triton's interpreter (see conftest),
on fresh random inputs of several small shapes, in float32 and bfloat16; and each torch
reference against a direct statement of what it computes."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from helpers import run_python
from vllm_plugins.adapters.iapt.layer import soft_attention
from vllm_plugins_kernels import eviction, expert_lora, rescale, soft_kv

# bfloat16: the kernel and the reference each round their result to bfloat16 (8 bits of
# mantissa), so the two differ by up to about two roundings of the output relative to the
# change they made: over 300 random inputs of the expert-LoRA case (4, 1, 4, 600, 300, 0),
# median 0.54%, 4 above 1% and at most 1.35% (a wrong kernel is off by tens of percent)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not out.isnan().any()
    return float((out - ref).norm() / ref.norm())


def paged_cache(num_blocks: int, kv_heads: int, block_size: int, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as vLLM's CPU backend views one layer's cache (strided, interleaved)."""
    cache = torch.randn(num_blocks, kv_heads, 2 * block_size, head_dim).to(dtype)
    return cache.chunk(2, dim=2)


def adapted_tokens(tokens: int, requests: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random subset of a step's tokens and the request each belongs to."""
    index = torch.randperm(tokens)[: max(1, tokens * 2 // 3)].sort().values
    return index, torch.randint(0, requests, (len(index),))


def every_token(tokens: int, requests: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of a step, as a captured graph passes them: a random third of them with
    row -1 (no request the kernel acts for), the others a request's row."""
    rows = torch.randint(0, requests, (tokens,))
    rows[torch.randperm(tokens)[: tokens // 3]] = -1
    return torch.arange(tokens), rows


@DTYPES
@pytest.mark.parametrize("select", [adapted_tokens, every_token], ids=["listed", "every"])
@pytest.mark.parametrize("tokens,requests,segments", [(5, 2, ((0, 24), (40, 8))), (17, 5, ((16, 48),)), (1, 1, ((3, 1000), (1100, 30)))])
def test_rescale_matches_reference(dtype, select, tokens, requests, segments):
    columns = max(start + width for start, width in segments) + 7
    out = torch.randn(tokens, columns).to(dtype)
    index, rows = select(tokens, requests)
    scales = torch.rand(requests, sum(w for _, w in segments)).to(dtype) + 0.5
    ref, got = out.clone(), out.clone()
    rescale.rescale_columns_torch(ref, index, rows, scales, segments)
    rescale.rescale_columns_triton(got, index, rows, scales, segments)
    assert relative_error(got, ref) < TOLERANCE[dtype]
    untouched = torch.ones(tokens, columns, dtype=torch.bool)
    for start, width in segments:
        untouched[index[rows >= 0], start : start + width] = False
    assert torch.equal(got[untouched], out[untouched])


def test_rescale_reference_is_per_request_product():
    out = torch.randn(4, 10)
    scales = torch.randn(2, 5)
    ref = out.clone()
    rescale.rescale_columns_torch(ref, torch.tensor([0, 1, 3]), torch.tensor([-1, 1, 0]), scales, ((0, 2), (7, 3)))
    expected = out.clone()
    expected[1, [0, 1, 7, 8, 9]] *= scales[1]
    expected[3, [0, 1, 7, 8, 9]] *= scales[0]
    assert torch.equal(ref, expected)


@DTYPES
def test_rescale_leaves_tokens_of_row_minus_one_alone(dtype):
    """Every token fed, those without a request row marked -1 (as a CUDA graph feeds them)."""
    out = torch.randn(6, 40).to(dtype)
    rows = torch.tensor([-1, 1, -1, 0, 2, -1])
    scales = torch.rand(3, 30).to(dtype) + 0.5
    ref, got = out.clone(), out.clone()
    rescale.rescale_columns_torch(ref, torch.arange(6), rows, scales, ((0, 20), (30, 10)))
    rescale.rescale_columns_triton(got, torch.arange(6), rows, scales, ((0, 20), (30, 10)))
    assert relative_error(got, ref) < TOLERANCE[dtype]
    assert torch.equal(got[rows < 0], out[rows < 0]) and torch.equal(ref[rows < 0], out[rows < 0])
    compact = out.clone()
    rescale.rescale_columns_torch(compact, torch.tensor([1, 3, 4]), torch.tensor([1, 0, 2]), scales, ((0, 20), (30, 10)))
    assert torch.equal(ref, compact)


@DTYPES
@pytest.mark.parametrize("requests,num_soft,kv_heads,head_dim,block_size", [(3, 4, 2, 32, 16), (1, 4, 4, 64, 8), (5, 3, 1, 48, 12)])
def test_write_soft_kv_matches_reference(dtype, requests, num_soft, kv_heads, head_dim, block_size):
    key_cache, value_cache = paged_cache(6, kv_heads, block_size, head_dim, dtype)
    keys, values = torch.randn(2, requests, num_soft, kv_heads, head_dim).to(dtype)
    blocks = torch.arange(requests) % 6  # distinct (block, run) per request
    first = (torch.arange(requests) // 6) * num_soft
    ref_k, ref_v, got_k, got_v = key_cache.clone(), value_cache.clone(), key_cache.clone(), value_cache.clone()
    soft_kv.write_soft_kv_torch(ref_k, ref_v, keys, values, blocks, first)
    soft_kv.write_soft_kv_triton(got_k, got_v, keys, values, blocks, first)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    assert torch.equal(ref_k[blocks[0], :, first[0] : first[0] + num_soft], keys[0].transpose(0, 1).to(dtype))


def soft_token_runs(requests: int, num_blocks: int, block_size: int, counts: list[int]) -> torch.Tensor:
    """(requests, 3): each request's soft-token block, first slot and count, in distinct blocks."""
    blocks = torch.randperm(num_blocks)[:requests]
    count = torch.tensor([counts[r % len(counts)] for r in range(requests)])
    first = (torch.rand(requests) * (block_size - count + 1)).long()
    return torch.stack([blocks, first, count], dim=1)


@DTYPES
@pytest.mark.parametrize("select", [adapted_tokens, every_token], ids=["listed", "every"])
@pytest.mark.parametrize("tokens,requests,heads,kv_heads,head_dim,counts", [
    (6, 3, 4, 2, 32, [4]), (9, 4, 8, 8, 16, [4, 1, 3]), (3, 1, 6, 2, 64, [3]),
])
def test_soft_attention_matches_reference(dtype, select, tokens, requests, heads, kv_heads, head_dim, counts):
    block_size = 8
    key_cache, value_cache = paged_cache(requests + 2, kv_heads, block_size, head_dim, dtype)
    runs = soft_token_runs(requests, requests + 2, block_size, counts)
    index, rows = select(tokens, requests)
    queries = torch.randn(tokens, heads * head_dim).to(dtype)
    out = torch.randn(tokens, heads * head_dim).to(dtype)
    args = (queries, index, rows, runs, key_cache, value_cache, max(counts), head_dim**-0.5)
    ref, got = out.clone(), out.clone()
    soft_kv.soft_attention_paged_torch(ref, *args)
    soft_kv.soft_attention_paged_triton(got, *args)
    assert relative_error(got - out.float(), ref - out.float()) < TOLERANCE[dtype]
    others = torch.ones(tokens, dtype=torch.bool)
    others[index[rows >= 0]] = False
    assert torch.equal(got[others], out[others])


def test_soft_attention_reference_reads_the_request_slots():
    heads, head_dim, num_soft = 2, 16, 3
    key_cache, value_cache = paged_cache(3, 1, 8, head_dim, torch.float32)
    q = torch.randn(2, heads * head_dim)
    out = torch.zeros(2, heads * head_dim)
    runs = torch.tensor([[0, 0, 4], [2, 4, num_soft]])
    soft_kv.soft_attention_paged_torch(out, q, torch.tensor([0, 1]), torch.tensor([1, -1]), runs, key_cache, value_cache, 4, 0.25)
    keys, values = key_cache[2, :, 4:7].transpose(0, 1)[None], value_cache[2, :, 4:7].transpose(0, 1)[None]
    assert torch.allclose(out[0], soft_attention(q[:1].view(1, 1, heads, head_dim), keys, values, 0.25).reshape(-1))
    assert not out[1].any()


@DTYPES
@pytest.mark.parametrize("tokens,slots,rank,in_features,out_features,start", [(7, 3, 8, 96, 40, 16), (4, 1, 4, 600, 300, 0), (10, 5, 16, 64, 520, 8)])
def test_expert_lora_matches_reference(dtype, tokens, slots, rank, in_features, out_features, start):
    out = torch.randn(tokens, start + out_features + 5).to(dtype)
    x = torch.randn(tokens, in_features).to(dtype)
    index, _ = adapted_tokens(tokens, 1)
    token_slots = torch.randint(-1, slots, (len(index),))
    token_slots[0] = 0  # at least one token with an expert
    scales = torch.rand(len(index)) + 0.5
    lora_a = torch.randn(slots, rank, in_features).to(dtype) / in_features**0.5
    lora_b = torch.randn(slots, out_features, rank).to(dtype)
    ref, got = out.clone(), out.clone()
    args = (x, index, token_slots, scales, lora_a, lora_b, start)
    expert_lora.expert_lora_torch(ref, *args)
    expert_lora.expert_lora_triton(got, *args)
    assert relative_error(got.float() - out.float(), ref.float() - out.float()) < TOLERANCE[dtype]
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[index[token_slots >= 0], start : start + out_features] = False
    assert torch.equal(got[untouched], out[untouched])


def test_expert_lora_reference_is_per_token_lora():
    x, out = torch.randn(3, 8), torch.zeros(3, 6)
    lora_a, lora_b = torch.randn(2, 2, 8), torch.randn(2, 4, 2)
    expert_lora.expert_lora_torch(out, x, torch.tensor([0, 2]), torch.tensor([1, -1]), torch.tensor([0.5, 9.0]), lora_a, lora_b, 1)
    expected = torch.zeros(3, 6)
    expected[0, 1:5] = 0.5 * lora_b[1] @ (lora_a[1] @ x[0])
    assert torch.allclose(out, expected)


def random_block_tables(seq_lens: list[int], block_size: int) -> tuple[torch.Tensor, int]:
    """Each request's blocks, drawn without overlap from a shuffled pool."""
    needed = [-(-n // block_size) for n in seq_lens]
    pool = torch.randperm(sum(needed) + 3)
    table = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    used = 0
    for r, count in enumerate(needed):
        table[r, :count] = pool[used : used + count]
        used += count
    return table, len(pool)


@DTYPES
@pytest.mark.parametrize("seq_lens,num_proxy,heads,kv_heads,head_dim,block_size", [([40, 75], 5, 4, 2, 32, 16), ([130], 16, 2, 2, 16, 32), ([20, 9, 64], 3, 6, 3, 64, 8), ([1100, 600], 4, 2, 1, 16, 64)])
def test_proxy_scores_match_reference(dtype, seq_lens, num_proxy, heads, kv_heads, head_dim, block_size):
    table, num_blocks = random_block_tables(seq_lens, block_size)
    key_cache, _ = paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype)
    queries = torch.randn(len(seq_lens), num_proxy, heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = eviction.proxy_attention_scores_torch(queries, key_cache, table, lens, head_dim**-0.5)
    got = eviction.proxy_attention_scores_triton(queries, key_cache, table, lens, head_dim**-0.5)
    assert relative_error(got, ref) < TOLERANCE[dtype]
    # every query's softmax sums to one, so a request's scores sum to P * heads
    assert torch.allclose(got.sum(dim=(1, 2)), torch.full((len(seq_lens),), float(num_proxy * heads)), rtol=1e-3)


def test_proxy_scores_reference_is_causal_attention_column_sum():
    torch.manual_seed(0)
    n, num_proxy, heads, head_dim, block_size = 12, 3, 2, 16, 4
    table, num_blocks = random_block_tables([n], block_size)
    key_cache, _ = paged_cache(num_blocks, 1, block_size, head_dim, torch.float32)
    queries = torch.randn(1, num_proxy, heads, head_dim)
    keys = torch.stack([key_cache[table[0, j // block_size], 0, j % block_size] for j in range(n)])
    expected = torch.zeros(n)
    for p in range(num_proxy):
        for h in range(heads):
            seen = n - num_proxy + p + 1
            expected[:seen] += torch.softmax(keys[:seen] @ queries[0, p, h] * 0.5, dim=0)
    scores = eviction.proxy_attention_scores_torch(queries, key_cache, table, torch.tensor([n]), 0.5)
    assert torch.allclose(scores[0, 0], expected, atol=1e-6)


def random_keep(seq_lens: list[int], kv_heads: int, kept: int) -> torch.Tensor:
    return torch.stack([torch.stack([torch.randperm(n)[:kept].sort().values for _ in range(kv_heads)]) for n in seq_lens])


@DTYPES
@pytest.mark.parametrize("requests,kv_heads,seq_len,kept,head_dim,block_size", [(2, 2, 50, 10, 32, 16), (1, 4, 200, 150, 16, 8), (3, 1, 33, 31, 64, 32)])
def test_compaction_matches_reference(dtype, requests, kv_heads, seq_len, kept, head_dim, block_size):
    seq_lens = [seq_len - r for r in range(requests)]
    table, num_blocks = random_block_tables(seq_lens, block_size)
    key_cache, value_cache = paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype)
    keep = random_keep(seq_lens, kv_heads, kept)
    ref_k, ref_v, got_k, got_v = (c.clone() for c in (key_cache, value_cache, key_cache, value_cache))
    eviction.compact_kept_torch(ref_k, ref_v, table, keep, torch.tensor(seq_lens))
    eviction.compact_kept_triton(got_k, got_v, table, keep, torch.tensor(seq_lens))
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


@DTYPES
@pytest.mark.parametrize("keys_dim_major", [False, True], ids=["token-major", "dim-major"])
@pytest.mark.parametrize("requests,kv_heads,seq_len,kept,head_dim,block_size", [(2, 2, 50, 10, 32, 16), (1, 4, 200, 150, 16, 8)])
def test_cpu_compaction_matches_reference(dtype, keys_dim_major, requests, kv_heads, seq_len, kept, head_dim, block_size):
    """The CPU worker's compiled loop against the torch reference, keys also as vLLM's
    ``vec`` ISA stores them (dim-major: strided token views)."""
    from vllm_plugins_kernels.eviction_cpu import compact_kept_cpu

    seq_lens = [seq_len - r for r in range(requests)]
    table, num_blocks = random_block_tables(seq_lens, block_size)
    key_cache, value_cache = paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype)
    if keys_dim_major:
        key_cache = key_cache.contiguous().view(num_blocks, kv_heads, head_dim, block_size).transpose(2, 3)
    keep = random_keep(seq_lens, kv_heads, kept)
    ref_k, ref_v, got_k, got_v = (c.clone() for c in (key_cache, value_cache, key_cache, value_cache))
    eviction.compact_kept_torch(ref_k, ref_v, table, keep, torch.tensor(seq_lens))
    compact_kept_cpu(got_k, got_v, table, keep, torch.tensor(seq_lens))
    assert not torch.equal(got_k, key_cache)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


def test_cpu_compaction_of_every_layer_at_once_matches_the_reference_per_layer():
    """compact_kept_layers_: one compiled call, the layers in parallel, each layer's own
    tokens moved in its own cache."""
    seq_lens, kv_heads, block_size, layers = [40, 33], 2, 8, 3
    table, num_blocks = random_block_tables(seq_lens, block_size)
    caches = [paged_cache(num_blocks, kv_heads, block_size, 16, torch.float32) for _ in range(layers)]
    keep = torch.stack([random_keep(seq_lens, kv_heads, 12) for _ in range(layers)])
    assert not torch.equal(keep[0], keep[1])
    refs = [(k.clone(), v.clone()) for k, v in caches]
    for (ref_k, ref_v), layer_keep in zip(refs, keep):
        eviction.compact_kept_torch(ref_k, ref_v, table, layer_keep, torch.tensor(seq_lens))
    eviction.compact_kept_layers_(caches, table, keep, torch.tensor(seq_lens))
    for (got_k, got_v), (ref_k, ref_v) in zip(caches, refs):
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


def test_compaction_reference_moves_kept_tokens_in_order_to_the_trailing_slots():
    block_size, seq_len = 4, 10
    table, num_blocks = random_block_tables([seq_len], block_size)
    key_cache, value_cache = paged_cache(num_blocks, 2, block_size, 16, torch.float32)

    def token(cache, head, j):
        return cache[table[0, j // block_size], head, j % block_size].clone()

    keep = torch.tensor([[[1, 5, 6, 9]], [[0, 2, 3, 8]]]).view(1, 2, 4)
    before = {(h, j): (token(key_cache, h, j), token(value_cache, h, j)) for h in range(2) for j in range(seq_len)}
    eviction.compact_kept_torch(key_cache, value_cache, table, keep, torch.tensor([seq_len]))
    for h in range(2):
        for i, j in enumerate(keep[0, h].tolist()):
            assert torch.equal(token(key_cache, h, seq_len - 4 + i), before[h, j][0])
            assert torch.equal(token(value_cache, h, seq_len - 4 + i), before[h, j][1])


def test_public_ops_run_the_references_off_cuda(monkeypatch):
    """On CPU tensors the plugins' ops never launch a Triton kernel."""

    def no_triton(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for CPU tensors")

    for module, launcher in [
        (rescale, "rescale_columns_triton"), (soft_kv, "write_soft_kv_triton"), (soft_kv, "soft_attention_paged_triton"),
        (expert_lora, "expert_lora_triton"), (eviction, "proxy_attention_scores_triton"), (eviction, "compact_kept_triton"),
    ]:
        monkeypatch.setattr(module, launcher, no_triton)
    out = torch.randn(3, 8)
    expected = out.clone()
    expected[1, 2:4] *= 2.0
    rescale.rescale_columns_(out, torch.tensor([1]), torch.tensor([0]), torch.full((1, 2), 2.0), ((2, 2),))
    assert torch.equal(out, expected)
    key_cache, value_cache = paged_cache(2, 1, 8, 16, torch.float32)
    keys = torch.randn(1, 4, 1, 16)
    soft_kv.write_soft_kv(key_cache, value_cache, keys, keys, torch.tensor([1]), torch.tensor([4]))
    assert torch.equal(key_cache[1, 0, 4:8], keys[0, :, 0])
    out = torch.zeros(1, 16)
    soft_kv.soft_attention_paged_(out, torch.randn(1, 16), torch.tensor([0]), torch.tensor([0]), torch.tensor([[1, 4, 4]]), key_cache, value_cache, 4, 0.25)
    assert out.abs().sum() > 0
    out = torch.zeros(1, 4)
    expert_lora.expert_lora_(out, torch.randn(1, 8), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), torch.randn(1, 2, 8), torch.randn(1, 4, 2), 0)
    assert out.abs().sum() > 0
    table = torch.tensor([[0, 1]])
    scores = eviction.proxy_attention_scores(torch.randn(1, 2, 1, 16), key_cache, table, torch.tensor([10]), 0.25)
    assert torch.allclose(scores.sum(), torch.tensor(2.0))
    eviction.compact_kept_(key_cache, value_cache, table, torch.tensor([[[3, 9]]]), torch.tensor([10]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_kernels_needs_a_gpu():
    from vllm_plugins.bench.kernels import run_kernel_bench

    with pytest.raises(ValueError, match="CUDA GPU"):
        run_kernel_bench()



def test_run_in_parts_runs_contiguous_parts_at_once_on_the_calling_thread_and_helpers(monkeypatch):
    """Each index once, one contiguous part per torch thread, the first on the calling
    thread; the parts run at the same time (a barrier every part waits at would time out
    if they ran one after another). Fewer indices than threads: one part each."""
    from vllm_plugins_kernels.eviction_cpu import run_in_parts

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    for total, expected in ((7, [(0, 2), (2, 4), (4, 7)]), (2, [(0, 1), (1, 2)]), (1, [(0, 1)])):
        barrier, parts = threading.Barrier(len(expected), timeout=30), []

        def part(first: int, stop: int) -> None:
            parts.append((first, stop, threading.get_ident()))
            barrier.wait()

        run_in_parts(part, total)
        assert sorted((a, b) for a, b, _ in parts) == expected
        assert len({t for *_, t in parts}) == len(expected)
        assert (0, expected[0][1], threading.get_ident()) in parts


@pytest.mark.parametrize("failing", ["helper", "caller"])
def test_run_in_parts_raises_a_part_error_once_every_part_ended(monkeypatch, failing):
    from vllm_plugins_kernels.eviction_cpu import run_in_parts

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ended = []

    def part(first: int, stop: int) -> None:
        if (first == 0) == (failing == "caller"):
            raise RuntimeError(f"part {first}")
        time.sleep(0.2)
        ended.append(first)

    with pytest.raises(RuntimeError, match="part 0" if failing == "caller" else "part 2"):
        run_in_parts(part, 4)
    assert ended == ([2] if failing == "caller" else [0])


def test_run_in_parts_called_from_a_helper_runs_there_whole(monkeypatch):
    """A part that splits its own work again must not wait for helpers that are all busy
    running parts: it runs the whole inner range itself."""
    from vllm_plugins_kernels.eviction_cpu import run_in_parts

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    inner = []

    def part(first: int, stop: int) -> None:
        run_in_parts(lambda a, b: inner.append((first, a, b, threading.get_ident())), 6)

    outer = threading.Thread(target=run_in_parts, args=(part, 2), daemon=True)  # a deadlock fails, not hangs, the test
    outer.start()
    outer.join(60)
    assert not outer.is_alive()
    by_outer = {first: [(a, b) for f, a, b, _ in inner if f == first] for first in (0, 1)}
    assert by_outer[1] == [(0, 6)] and sorted(by_outer[0]) == [(0, 3), (3, 6)]


def test_the_compiled_loops_release_the_gil():
    """Without nogil the parts would run one after another on the helpers and every other
    test would still pass."""
    from vllm_plugins.eviction.farthest_points import _compiled_loop
    from vllm_plugins_kernels.eviction_cpu import _compact_layers

    assert _compiled_loop(8).targetoptions["nogil"] and _compact_layers.targetoptions["nogil"]


def test_run_in_parts_helpers_use_the_cores_of_the_process_not_one_pinned_core():
    """A thread inherits its creator's CPU mask; with the calling thread pinned to one core
    (as vLLM's GOMP_CPU_AFFINITY pins its worker) a helper still gets the others."""
    script = ("import os, threading, torch\n"
              "torch.set_num_threads(2)\n"
              "from vllm_plugins_kernels.eviction_cpu import run_in_parts\n"
              "stop = threading.Event(); other = threading.Thread(target=stop.wait); other.start()\n"
              "os.sched_setaffinity(0, {0})\n"
              "masks = {}\n"
              "run_in_parts(lambda a, b: masks.update({a: sorted(os.sched_getaffinity(0))}), 2)\n"
              "stop.set(); print(masks[0], masks[1])\n")
    caller, helper = run_python(script, timeout=120).strip().splitlines()[-1].split("] [")
    assert caller == "[0" and len(helper.rstrip("]").split(",")) == len(os.sched_getaffinity(0)) > 1


def test_run_in_parts_works_in_a_forked_child():
    """A forked child has none of its parent's helper threads: it makes its own (a stale
    pool would leave the child waiting forever)."""
    script = ("import os, signal, torch\n"
              "torch.set_num_threads(2)\n"
              "from vllm_plugins_kernels.eviction_cpu import run_in_parts\n"
              "done = []\n"
              "run_in_parts(lambda a, b: done.append((a, b)), 2)\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    signal.alarm(60)  # a child left waiting ends\n"
              "    run_in_parts(lambda a, b: done.append((a, b)), 2)\n"
              "    os._exit(0 if len(done) == 4 else 3)\n"
              "print(os.waitpid(pid, 0)[1])\n")
    assert run_python(script, timeout=120).split()[-1] == "0"
