"""Where the plugins read and write a cached token (vllm_plugins/serving/paged_cache.py),
against vLLM 0.32's own layouts, on the CPU.

GPU backends: each layer's cache is allocated by vLLM's own ``allocate_kv_cache``, in
every KV cache layout vLLM knows, and tokens are written through the FlashAttention and
Triton backends' own ``do_kv_cache_update`` (their view of the cache, from vLLM's code);
only the write kernel under it, which needs a GPU, is replaced by a plain statement of
its contract (``key_cache[slot // block_size, slot % block_size] = key``). The plugins'
kernels then run on those views in Triton's interpreter. CPU backend: vLLM's own CPU
cache-write op, on each ISA's layout.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_plugins.serving import paged_cache
from vllm_plugins_kernels import eviction, soft_kv

NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_DIM = 5, 2, 16, 32


def _allocated_layer(layout, dtype=torch.float32) -> torch.Tensor:
    """Layer 1 of a 3-layer model's KV cache, as vLLM's GPU worker allocates it in ``layout``."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor, compute_layout_strides
    from vllm.v1.worker.utils import allocate_kv_cache

    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=dtype)
    layers = ["layers.0.attn", "layers.1.attn", "layers.2.attn"]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, len(layers), layout)
    tensor = KVCacheTensor(size=len(layers) * NUM_BLOCKS * spec.page_size_bytes, layers=layers,
                           layer_stride=layer_stride, block_stride=block_stride)
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[tensor], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    return allocate_kv_cache(config, torch.device("cpu"), layout)["layers.1.attn"]


def _write_kernel_contract(key, value, key_cache, value_cache, slot_mapping, *args, **kwargs):
    """What vLLM's ``reshape_and_cache_flash`` kernels do (CUDA / Triton): token t into
    slot s, caches viewed (num_blocks, block_size, kv_heads, head_size)."""
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            key_cache[slot // block_size, slot % block_size] = key[t]
            value_cache[slot // block_size, slot % block_size] = value[t]


def _vllm_cache_update(backend: str, monkeypatch):
    """The backend's own ``do_kv_cache_update`` (its impl built bare: the method reads
    only the attributes set here), with the kernel under it stated as its contract; also
    returns the (key_cache, value_cache) views vLLM handed to the kernel."""
    from vllm.v1.attention.backend import AttentionType

    handed = []

    def kernel(key, value, key_cache, value_cache, *rest):
        handed.append((key_cache, value_cache))
        _write_kernel_contract(key, value, key_cache, value_cache, *rest)

    if backend == "FLASH_ATTN":
        from vllm.v1.attention.backends import flash_attn as module

        impl = object.__new__(module.FlashAttentionImpl)
        # imported there only where FlashAttention's kernels are (not on the CPU build)
        monkeypatch.setattr(module, "reshape_and_cache_flash", kernel, raising=False)
    else:
        from vllm.v1.attention.backends import triton_attn as module

        impl = object.__new__(module.TritonAttentionImpl)
        impl._is_per_token_head_quant = False
        monkeypatch.setattr(module, "triton_reshape_and_cache_flash", kernel)
    impl.attn_type, impl.head_size, impl.kv_cache_dtype = AttentionType.DECODER, HEAD_DIM, "auto"
    layer = SimpleNamespace(_k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0))

    def update(key, value, kv_cache, slots):
        impl.do_kv_cache_update(layer, key, value, kv_cache, slots)
        return handed[-1]

    return update


def _layer(kv_cache: torch.Tensor, backend: str, isa: str | None = None):
    """A stand-in for vLLM's ``Attention``: the attributes the plugins read of it."""
    return SimpleNamespace(kv_cache=kv_cache, isa=isa, attn_backend=SimpleNamespace(get_name=lambda: backend))


def _layouts():
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return list(KVCacheLayout)


@pytest.mark.parametrize("backend", paged_cache.FLASH_LAYOUT_BACKENDS)
@pytest.mark.parametrize("layout", _layouts(), ids=lambda layout: layout.name)
def test_a_token_vllm_writes_is_where_the_plugins_read_it_on_gpu_backends(backend, layout, monkeypatch):
    kv_cache = _allocated_layer(layout)
    slots = torch.tensor([0, 17, 33, 47, 5, 79])
    key, value = torch.randn(2, len(slots), KV_HEADS, HEAD_DIM)
    _vllm_cache_update(backend, monkeypatch)(key, value, kv_cache, slots)
    keys, values = paged_cache.paged_key_value(_layer(kv_cache, backend))
    assert keys.shape == values.shape == (NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_DIM) and keys.stride(3) == 1
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(keys[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE], key[t])
        assert torch.equal(values[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE], value[t])
    assert int((keys != 0).sum() + (values != 0).sum()) == 2 * key.numel()  # nothing else was written


@pytest.mark.parametrize("backend", paged_cache.FLASH_LAYOUT_BACKENDS)
@pytest.mark.parametrize("layout", _layouts(), ids=lambda layout: layout.name)
def test_soft_tokens_the_plugins_write_are_where_vllm_reads_them(backend, layout, monkeypatch):
    """IAPT's write kernel (in Triton's interpreter) on the view; vLLM's view of the same
    memory (the one its attention kernels read) holds the soft keys/values at their slots."""
    kv_cache = _allocated_layer(layout)
    vllm_keys, vllm_values = _vllm_cache_update(backend, monkeypatch)(
        torch.zeros(0, KV_HEADS, HEAD_DIM), torch.zeros(0, KV_HEADS, HEAD_DIM), kv_cache, torch.zeros(0, dtype=torch.int64))
    keys, values = torch.randn(2, 2, 4, KV_HEADS, HEAD_DIM)
    blocks, first = torch.tensor([3, 1]), torch.tensor([8, 0])
    soft_kv.write_soft_kv_triton(*paged_cache.paged_key_value(_layer(kv_cache, backend)), keys, values, blocks, first)
    for r in range(2):
        for j in range(4):
            assert torch.equal(vllm_keys[blocks[r], first[r] + j], keys[r, j])
            assert torch.equal(vllm_values[blocks[r], first[r] + j], values[r, j])


@pytest.mark.parametrize("layout", _layouts(), ids=lambda layout: layout.name)
def test_the_plugins_kernels_read_and_move_tokens_on_the_gpu_layout(layout):
    """Soft attention, proxy scores and compaction (Triton, in the interpreter) against
    their torch references on views of a cache allocated as vLLM allocates it."""
    kv_cache = _allocated_layer(layout)
    kv_cache.copy_(torch.randn(kv_cache.shape))
    key_cache, value_cache = paged_cache.flash_layout_key_value(kv_cache)

    heads, tokens = 2 * KV_HEADS, 3
    queries, out = torch.randn(2, tokens, heads * HEAD_DIM)
    runs = torch.tensor([[4, 4, 4], [2, 0, 3]])  # per request: block, first slot, count
    args = (queries, torch.arange(tokens), torch.tensor([0, 1, -1]), runs, key_cache, value_cache, 4, HEAD_DIM**-0.5)
    ref, got = out.clone(), out.clone()
    soft_kv.soft_attention_paged_torch(ref, *args)
    soft_kv.soft_attention_paged_triton(got, *args)
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(got[2], out[2])

    table, seq_lens = torch.tensor([[4, 1, 3]]), torch.tensor([40])
    proxy = torch.randn(1, 3, heads, HEAD_DIM)
    scores = eviction.proxy_attention_scores_triton(proxy, key_cache, table, seq_lens, 0.2)
    assert torch.allclose(scores, eviction.proxy_attention_scores_torch(proxy, key_cache, table, seq_lens, 0.2), atol=1e-5)

    keep = torch.stack([torch.randperm(40)[:10].sort().values for _ in range(KV_HEADS)])[None]
    ref = kv_cache.clone()
    eviction.compact_kept_torch(*paged_cache.flash_layout_key_value(ref), table, keep, seq_lens)
    eviction.compact_kept_triton(key_cache, value_cache, table, keep, seq_lens)
    assert torch.equal(kv_cache, ref)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_a_token_vllms_cpu_op_writes_is_where_the_plugins_read_it(isa):
    from vllm_plugins.serving import vllm_internals as vi

    kv_cache = torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    key_half, value_half = kv_cache.view(NUM_BLOCKS, KV_HEADS, 2 * BLOCK_SIZE, HEAD_DIM).chunk(2, dim=2)
    slots = torch.tensor([0, 17, 33, 47, 5, 79])
    key, value = torch.randn(2, len(slots), KV_HEADS, HEAD_DIM)
    vi.cpu_reshape_and_cache(key, value, key_half, value_half, slots, isa)
    keys, values = paged_cache.paged_key_value(_layer(kv_cache, paged_cache.CPU_BACKEND, isa))
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(keys[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE], key[t])
        assert torch.equal(values[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE], value[t])


def test_a_backend_or_layout_the_plugins_do_not_know_is_refused():
    kv_cache = torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    with pytest.raises(NotImplementedError, match="FLASHINFER"):
        paged_cache.paged_key_value(_layer(kv_cache, "FLASHINFER"))
    with pytest.raises(NotImplementedError, match="flash layout"):
        paged_cache.flash_layout_key_value(kv_cache.transpose(2, 3))
    with pytest.raises(NotImplementedError, match="flash layout"):
        paged_cache.flash_layout_key_value(torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM + 1))
    with pytest.raises(NotImplementedError, match="FLASHINFER"):
        paged_cache.check_attention_backends(["FLASH_ATTN", "FLASHINFER"], [16], 16)
    with pytest.raises(ValueError, match="blocks of 16 tokens"):
        paged_cache.check_attention_backends(["TRITON_ATTN"], [16], 64)
    paged_cache.check_attention_backends(["FLASH_ATTN", "TRITON_ATTN", "CPU_ATTN"], [64], 64)
