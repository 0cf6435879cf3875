"""``vllm-plugins bench kernels``: the plugins' Triton kernels at serving shapes on a GPU.

For a Llama-3-8B-sized model (hidden 4096, 32 layers, 32 query and 8 KV heads of 128,
FFN 14336), in bfloat16, with every layer's buffers distinct (so timings are not of data
left in L2):

* decode, per step and all 32 layers, at 1 to 256 requests and 16 or 512 adapters: PARA's
  rescaling, IAPT's soft attention, MiLoRA's 3-of-7 experts (rank 8), and stock LoRA on
  all 7 modules (rank 8) through vLLM's own shrink/expand Triton kernels;
* prefill, per request batch: writing IAPT's soft keys/values, and KV eviction's
  proxy-attention scores and compaction of the kept 20% of a 4096-token prompt.

Each figure is the median of CUDA-graph replays timed with device events
(:mod:`.device_timing`), with the bytes the work must move at the least (each input read
once, each output written once) over the time, against the device's measured copy
bandwidth and against copies moving the same bytes per launch. Unless ``--no-check`` is
given, every kernel is first compared with its torch reference at these shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES, Dims
from vllm_plugins.bench.device_timing import copy_bandwidth_gbps, launched_copy_gbps, median_ms
from vllm_plugins.serving.paged_cache import flash_layout_key_value
from vllm_plugins_kernels import compact_kept_, expert_lora_, proxy_attention_scores, rescale_columns_, soft_attention_paged_, write_soft_kv
from vllm_plugins_kernels import eviction, expert_lora, rescale, soft_kv

BATCHES = (1, 16, 64, 256)
ADAPTER_COUNTS = (16, 512)
EVICTION_BATCHES = (1, 16, 64)
LORA = "lora (vLLM kernels)"
LORA_ACTIVE = "lora (vLLM kernels, active-adapter grid)"
MILORA_MODULES = LINEAR_MODULES  # one expert per linear module
LAUNCHES_PER_LAYER = {
    "para": 2, "iapt": 1, "iapt soft K/V write": 1, "milora": 2 * len(MILORA_MODULES), LORA: 8, LORA_ACTIVE: 8,
    "eviction scores": 2, "eviction compaction": 1,
}
"""Kernel launches per layer, to compare each kernel with copies of the same bytes per launch."""


LLAMA3_8B = Dims(hidden=4096, intermediate=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)


@dataclass(frozen=True)
class ServingShape:
    dims: Dims = LLAMA3_8B
    rank: int = 8
    num_soft: int = 4
    block_size: int = 16
    milora_top_k: int = 3
    prompt_len: int = 4096
    num_proxy: int = 64
    keep_ratio: float = 0.2

    def module_shape(self, name: str) -> tuple[int, int, str, int]:
        """(in, out, output site, first column in the site's fused output)."""
        q, kv, i = self.dims.q_size, self.dims.kv_size, self.dims.intermediate
        site, start = {
            "q_proj": ("qkv", 0), "k_proj": ("qkv", q), "v_proj": ("qkv", q + kv), "o_proj": ("o", 0),
            "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", i), "down_proj": ("down", 0),
        }[name]
        return (*self.dims.linear_shape(name), site, start)

    def site_width(self, site: str) -> int:
        d = self.dims
        return {"qkv": d.q_size + 2 * d.kv_size, "o": d.hidden, "gate_up": 2 * d.intermediate, "down": d.hidden}[site]


@dataclass
class Timing:
    kernel: str
    batch: int
    adapters: int | None
    ms: float
    bytes: int
    flops: int
    mode: str

    @property
    def gbps(self) -> float:
        return self.bytes / self.ms / 1e6


def _time(kernel: str, batch: int, adapters: int | None, fn: Callable[[], None], nbytes: int, flops: int = 0) -> Timing:
    ms, mode = median_ms(fn)
    return Timing(kernel, batch, adapters, ms, nbytes, flops, mode)


def _near_one(*size: int, dtype) -> torch.Tensor:
    """Scales close to 1, so that replaying an in-place rescale stays finite."""
    return (1 + 0.01 * torch.rand(*size, device="cuda")).to(dtype)


def _paged_cache(num_blocks: int, shape: ServingShape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (num_blocks, kv_heads, block_size, head_dim) of one layer's cache as
    vLLM 0.32's FlashAttention and Triton backends hold it by default: stored (num_blocks,
    block_size, kv_heads, 2 * head_dim), viewed through the serving plugins' own layout
    code (:mod:`vllm_plugins.serving.paged_cache`)."""
    stored = torch.randn(num_blocks, shape.block_size, shape.dims.num_kv_heads, 2 * shape.dims.head_dim, device="cuda")
    return flash_layout_key_value(stored.to(dtype).transpose(1, 2))


def para_decode(shape: ServingShape, batch: int, dtype) -> Timing:
    q, kv, i = shape.dims.q_size, shape.dims.kv_size, shape.dims.intermediate
    index = rows = torch.arange(batch, device="cuda")
    layers = [
        (torch.randn(batch, q + 2 * kv, device="cuda").to(dtype), _near_one(batch, q + kv, dtype=dtype),
         torch.randn(batch, 2 * i, device="cuda").to(dtype), _near_one(batch, i, dtype=dtype))
        for _ in range(shape.dims.num_layers)
    ]

    def step() -> None:
        for qkv, qkv_scales, gate_up, up_scales in layers:
            rescale_columns_(qkv, index, rows, qkv_scales, ((0, q), (q + kv, kv)))
            rescale_columns_(gate_up, index, rows, up_scales, ((i, i),))

    elt = torch.finfo(dtype).bits // 8
    nbytes = shape.dims.num_layers * batch * 3 * (q + kv + i) * elt  # out read + written, scales read
    return _time("para", batch, None, step, nbytes)


def _soft_token_runs(shape: ServingShape, requests: int) -> torch.Tensor:
    """(requests, 3): each request's soft-token block, first slot and count, packed
    ``block_size // num_soft`` requests to a block."""
    runs_per_block = shape.block_size // shape.num_soft
    request = torch.arange(requests, device="cuda")
    return torch.stack([request // runs_per_block, (request % runs_per_block) * shape.num_soft,
                        torch.full_like(request, shape.num_soft)], dim=1)


def iapt_decode(shape: ServingShape, batch: int, dtype) -> Timing:
    runs = _soft_token_runs(shape, batch)
    index = rows = torch.arange(batch, device="cuda")
    width = shape.dims.q_size
    layers = [
        (torch.randn(batch, width, device="cuda").to(dtype), torch.randn(batch, width, device="cuda").to(dtype),
         *_paged_cache(int(runs[-1, 0]) + 1, shape, dtype))
        for _ in range(shape.dims.num_layers)
    ]

    def step() -> None:
        for out, queries, key_cache, value_cache in layers:
            soft_attention_paged_(out, queries, index, rows, runs, key_cache, value_cache, shape.num_soft, shape.dims.head_dim**-0.5)

    elt = torch.finfo(dtype).bits // 8
    nbytes = shape.dims.num_layers * batch * (3 * width + 2 * shape.num_soft * shape.dims.kv_size) * elt
    return _time("iapt", batch, None, step, nbytes)


class MiloraBanks:
    """Every adapter's 7 experts for each layer, stacked per module (rank ``shape.rank``)."""

    def __init__(self, shape: ServingShape, adapters: int, dtype):
        self.shape, self.adapters, self.dtype = shape, adapters, dtype
        self.layers = [
            {
                name: (torch.randn(adapters, shape.rank, fan_in, device="cuda").to(dtype) * fan_in**-0.5,
                       torch.randn(adapters, fan_out, shape.rank, device="cuda").to(dtype) * 0.01)
                for name in MILORA_MODULES
                for fan_in, fan_out, _, _ in [shape.module_shape(name)]
            }
            for _ in range(shape.dims.num_layers)
        ]

    def decode(self, batch: int) -> Timing:
        shape, dtype = self.shape, self.dtype
        adapter = torch.arange(batch, device="cuda") % self.adapters
        chosen = torch.rand(batch, len(MILORA_MODULES), device="cuda").argsort(dim=1)[:, : shape.milora_top_k]
        index = torch.arange(batch, device="cuda")
        scales = torch.rand(batch, device="cuda")
        inputs = {"qkv": shape.dims.hidden, "o": shape.dims.q_size, "gate_up": shape.dims.hidden, "down": shape.dims.intermediate}
        calls = []
        nbytes = 0
        elt = torch.finfo(dtype).bits // 8
        for m, name in enumerate(MILORA_MODULES):
            fan_in, fan_out, site, start = shape.module_shape(name)
            picked = (chosen == m).any(dim=1)
            slots = torch.where(picked, adapter, -1)
            distinct = int(adapter[picked].unique().numel())
            nbytes += shape.dims.num_layers * (distinct * shape.rank * (fan_in + fan_out) + int(picked.sum()) * (fan_in + 2 * fan_out)) * elt
            calls.append((name, site, start, slots))
        sites = [
            ({s: torch.randn(batch, w, device="cuda").to(dtype) for s, w in inputs.items()},
             {s: torch.zeros(batch, shape.site_width(s), device="cuda", dtype=dtype) for s in inputs})
            for _ in range(shape.dims.num_layers)
        ]

        def step() -> None:
            for bank, (x, out) in zip(self.layers, sites):
                for name, site, start, slots in calls:
                    lora_a, lora_b = bank[name]
                    expert_lora_(out[site], x[site], index, slots, scales, lora_a, lora_b, start)

        return _time("milora", batch, self.adapters, step, nbytes)


def lora_decode(shape: ServingShape, adapters: int, batches: tuple[int, ...], dtype) -> list[Timing]:
    """Stock LoRA on all 7 modules through vLLM's own shrink/expand kernels, with a bank of
    ``adapters`` slots (``--max-loras``), in both of vLLM's launch shapes: a grid over every
    slot (the default) and over the active adapters only (``specialize_active_lora``)."""
    from vllm_plugins.bench.vllm_lora import VllmLoraLayer

    layers = [
        VllmLoraLayer(shape.dims.hidden, shape.dims.q_size, shape.dims.kv_size, shape.dims.intermediate, shape.rank, adapters, dtype, torch.device("cuda"))
        for _ in range(shape.dims.num_layers)
    ]
    elt = torch.finfo(dtype).bits // 8
    weights_per_adapter = sum(shape.rank * (fan_in + fan_out) for fan_in, fan_out, _, _ in map(shape.module_shape, MILORA_MODULES))
    activations_per_token = sum(fan_in + 2 * fan_out for fan_in, fan_out, _, _ in map(shape.module_shape, MILORA_MODULES))
    timings = []
    for batch in batches:
        slots = torch.arange(batch, device="cuda") % adapters
        distinct = min(batch, adapters)
        nbytes = shape.dims.num_layers * (distinct * weights_per_adapter + batch * activations_per_token) * elt
        for kernel, specialize in ((LORA, False), (LORA_ACTIVE, True)):
            for layer in layers:
                layer.prepare(slots, specialize_active_lora=specialize)

            def step() -> None:
                for layer in layers:
                    layer.run()

            timings.append(_time(kernel, batch, adapters, step, nbytes))
    return timings


def soft_kv_prefill(shape: ServingShape, batch: int, dtype) -> Timing:
    blocks, first, _ = _soft_token_runs(shape, batch).unbind(1)
    layers = [
        (*_paged_cache(int(blocks[-1]) + 1, shape, dtype),
         *torch.randn(2, batch, shape.num_soft, shape.dims.num_kv_heads, shape.dims.head_dim, device="cuda").to(dtype))
        for _ in range(shape.dims.num_layers)
    ]

    def step() -> None:
        for key_cache, value_cache, keys, values in layers:
            write_soft_kv(key_cache, value_cache, keys, values, blocks, first)

    nbytes = shape.dims.num_layers * 4 * batch * shape.num_soft * shape.dims.kv_size * (torch.finfo(dtype).bits // 8)
    return _time("iapt soft K/V write", batch, None, step, nbytes)


def _random_block_table(requests: int, blocks_per_request: int) -> torch.Tensor:
    return torch.randperm(requests * blocks_per_request, device="cuda", dtype=torch.int32).view(requests, blocks_per_request)


def _random_keep(requests: int, shape: ServingShape, kept: int) -> torch.Tensor:
    order = torch.rand(requests, shape.dims.num_kv_heads, shape.prompt_len, device="cuda").argsort(dim=-1)
    return order[..., :kept].sort(dim=-1).values.to(torch.int32).contiguous()


def eviction_prefill(shape: ServingShape, requests: int, dtype) -> list[Timing]:
    """Scores and compaction for ``requests`` prompts of ``shape.prompt_len`` tokens."""
    blocks_per_request = shape.prompt_len // shape.block_size
    kept = int(shape.keep_ratio * shape.prompt_len)
    seq_lens = torch.full((requests,), shape.prompt_len, device="cuda", dtype=torch.int32)
    layers = [
        (*_paged_cache(requests * blocks_per_request, shape, dtype), _random_block_table(requests, blocks_per_request),
         torch.randn(requests, shape.num_proxy, shape.dims.num_heads, shape.dims.head_dim, device="cuda").to(dtype),
         _random_keep(requests, shape, kept))
        for _ in range(shape.dims.num_layers)
    ]
    elt = torch.finfo(dtype).bits // 8
    scale = shape.dims.head_dim**-0.5

    def score() -> None:
        for key_cache, _, table, queries, _ in layers:
            proxy_attention_scores(queries, key_cache, table, seq_lens, scale, shape.prompt_len)

    def compact() -> None:
        for key_cache, value_cache, table, _, keep in layers:
            compact_kept_(key_cache, value_cache, table, keep, seq_lens)

    tokens = requests * shape.prompt_len
    score_bytes = shape.dims.num_layers * (tokens * shape.dims.kv_size + requests * shape.num_proxy * shape.dims.q_size) * elt
    score_flops = shape.dims.num_layers * 2 * (2 * requests * shape.num_proxy * shape.prompt_len * shape.dims.q_size)  # two passes of Q K^T
    compact_bytes = shape.dims.num_layers * 4 * requests * kept * shape.dims.kv_size * elt
    return [
        _time("eviction scores", requests, None, score, score_bytes, score_flops),
        _time("eviction compaction", requests, None, compact, compact_bytes),
    ]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float("nan") if out.isnan().any() else float((out - ref).norm() / ref.norm())


def check_kernels(shape: ServingShape) -> list[dict]:
    """Each kernel against its torch reference on fresh random inputs at serving shapes."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        tolerance = 1e-3 if dtype == torch.float32 else 1e-2
        for name, error in _check_errors(shape, dtype):
            results.append({"kernel": name, "dtype": str(dtype).removeprefix("torch."), "relative_error": error, "ok": error < tolerance})
    return results


def _check_errors(shape: ServingShape, dtype):
    cuda = "cuda"
    batch, q, kv, i = 256, shape.dims.q_size, shape.dims.kv_size, shape.dims.intermediate
    index = torch.randperm(batch, device=cuda)[: batch * 3 // 4].sort().values
    rows = torch.randint(0, 64, (len(index),), device=cuda)
    acted = torch.where(torch.rand(len(index), device=cuda) < 0.9, rows, -1)  # -1: a token the kernels leave alone

    out = torch.randn(batch, q + 2 * kv, device=cuda).to(dtype)
    scales = torch.randn(64, q + kv, device=cuda).to(dtype)
    ref, got = out.clone(), out.clone()
    rescale.rescale_columns_torch(ref, index, acted, scales, ((0, q), (q + kv, kv)))
    rescale.rescale_columns_triton(got, index, acted, scales, ((0, q), (q + kv, kv)))
    yield "para rescale", _relative_error(got, ref)

    key_cache, value_cache = _paged_cache(64, shape, dtype)
    run = torch.randperm(64 * shape.block_size // shape.num_soft, device=cuda)[:64]
    blocks, first = run // (shape.block_size // shape.num_soft), (run % (shape.block_size // shape.num_soft)) * shape.num_soft
    keys, values = torch.randn(2, 64, shape.num_soft, shape.dims.num_kv_heads, shape.dims.head_dim, device=cuda).to(dtype)
    ref_k, ref_v, got_k, got_v = (c.clone() for c in (key_cache, value_cache, key_cache, value_cache))
    soft_kv.write_soft_kv_torch(ref_k, ref_v, keys, values, blocks, first)
    soft_kv.write_soft_kv_triton(got_k, got_v, keys, values, blocks, first)
    yield "iapt soft K/V write", max(_relative_error(got_k, ref_k), _relative_error(got_v, ref_v))

    out = torch.randn(batch, q, device=cuda).to(dtype)
    queries = torch.randn(batch, q, device=cuda).to(dtype)
    ref, got = out.clone(), out.clone()
    runs = torch.stack([blocks, first, torch.full_like(blocks, shape.num_soft)], dim=1)
    args = (queries, index, acted, runs, ref_k, ref_v, shape.num_soft, shape.dims.head_dim**-0.5)
    soft_kv.soft_attention_paged_torch(ref, *args)
    soft_kv.soft_attention_paged_triton(got, *args)
    yield "iapt soft attention", _relative_error(got.float() - out.float(), ref.float() - out.float())

    x = torch.randn(batch, shape.dims.hidden, device=cuda).to(dtype)
    out = torch.randn(batch, 2 * i, device=cuda).to(dtype)
    lora_a = (torch.randn(64, shape.rank, shape.dims.hidden, device=cuda) * shape.dims.hidden**-0.5).to(dtype)
    lora_b = torch.randn(64, i, shape.rank, device=cuda).to(dtype)
    slots = torch.where(torch.rand(len(index), device=cuda) < 0.5, rows, -1)
    token_scales = torch.rand(len(index), device=cuda)
    ref, got = out.clone(), out.clone()
    args = (x, index, slots, token_scales, lora_a, lora_b, i)
    expert_lora.expert_lora_torch(ref, *args)
    expert_lora.expert_lora_triton(got, *args)
    yield "milora experts", _relative_error(got.float() - out.float(), ref.float() - out.float())

    requests, blocks_per_request = 4, shape.prompt_len // shape.block_size
    key_cache, value_cache = _paged_cache(requests * blocks_per_request, shape, dtype)
    table = _random_block_table(requests, blocks_per_request)
    seq_lens = torch.tensor([shape.prompt_len, 3000, 1000, 100], device=cuda, dtype=torch.int32)
    queries = torch.randn(requests, shape.num_proxy, shape.dims.num_heads, shape.dims.head_dim, device=cuda).to(dtype)
    ref = eviction.proxy_attention_scores_torch(queries, key_cache, table, seq_lens, shape.dims.head_dim**-0.5)
    got = eviction.proxy_attention_scores_triton(queries, key_cache, table, seq_lens, shape.dims.head_dim**-0.5)
    yield "eviction scores", _relative_error(got, ref)

    keep = _random_keep(requests, shape, int(shape.keep_ratio * shape.prompt_len))
    full = torch.full((requests,), shape.prompt_len, device=cuda, dtype=torch.int32)
    ref_k, ref_v, got_k, got_v = (c.clone() for c in (key_cache, value_cache, key_cache, value_cache))
    eviction.compact_kept_torch(ref_k, ref_v, table, keep, full)
    eviction.compact_kept_triton(got_k, got_v, table, keep, full)
    yield "eviction compaction", max(_relative_error(got_k, ref_k), _relative_error(got_v, ref_v))


def run_kernel_bench(check: bool = True, shape: ServingShape | None = None) -> dict:
    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA GPU")
    shape = shape or ServingShape()
    dtype = torch.bfloat16
    torch.manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(), "shape": asdict(shape), "dtype": "bfloat16"}
    if check:
        report["checks"] = check_kernels(shape)
    report["copy_gbps"] = copy_bandwidth_gbps()
    timings: list[Timing] = []
    for batch in BATCHES:
        timings += [para_decode(shape, batch, dtype), iapt_decode(shape, batch, dtype), soft_kv_prefill(shape, batch, dtype)]
        torch.cuda.empty_cache()
    for adapters in ADAPTER_COUNTS:
        banks = MiloraBanks(shape, adapters, dtype)
        timings += [banks.decode(batch) for batch in BATCHES]
        del banks
        torch.cuda.empty_cache()
        timings += lora_decode(shape, adapters, BATCHES, dtype)
        torch.cuda.empty_cache()
    for requests in EVICTION_BATCHES:
        timings += eviction_prefill(shape, requests, dtype)
        torch.cuda.empty_cache()
    same_size_copy = {}
    for t in timings:
        per_launch = t.bytes // (shape.dims.num_layers * LAUNCHES_PER_LAYER[t.kernel])
        if per_launch not in same_size_copy:
            same_size_copy[per_launch] = launched_copy_gbps(per_launch, shape.dims.num_layers * LAUNCHES_PER_LAYER[t.kernel])
    report["timings"] = [
        {**asdict(t), "gbps": t.gbps, "bandwidth_fraction": t.gbps / report["copy_gbps"],
         "same_size_copy_gbps": (copy := same_size_copy[t.bytes // (shape.dims.num_layers * LAUNCHES_PER_LAYER[t.kernel])]),
         "same_size_copy_fraction": t.gbps / copy}
        for t in timings
    ]
    report["decode_ratios"] = _decode_ratios(timings)
    return report


def _decode_ratios(timings: list[Timing]) -> list[dict]:
    """Each prompt-aware method's decode time over stock LoRA's at the same batch and
    adapters, LoRA taken in the faster of vLLM's two launch shapes."""
    by_key = {(t.kernel, t.batch, t.adapters): t.ms for t in timings}
    rows = []
    for adapters in ADAPTER_COUNTS:
        for batch in BATCHES:
            lora = min(by_key[(LORA, batch, adapters)], by_key[(LORA_ACTIVE, batch, adapters)])
            rows.append({
                "batch": batch, "adapters": adapters, "lora_ms": lora,
                "para_over_lora": by_key[("para", batch, None)] / lora,
                "iapt_over_lora": by_key[("iapt", batch, None)] / lora,
                "milora_over_lora": by_key[("milora", batch, adapters)] / lora,
            })
    return rows


def format_report(report: dict) -> str:
    lines = [f"{report['device']}, {report['dtype']}, copy bandwidth {report['copy_gbps']:.0f} GB/s (read + write)"]
    for check in report.get("checks", []):
        lines.append(f"check {check['kernel']:<22} {check['dtype']:<9} rel. error {check['relative_error']:.2e} {'ok' if check['ok'] else 'FAILED'}")
    lines.append("")
    lines.append("| kernel | batch | adapters | ms (32 layers) | GB/s | of copy bw | of same-size copies | TFLOP/s | timed as |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for t in report["timings"]:
        tflops = f"{t['flops'] / t['ms'] / 1e9:.1f}" if t["flops"] else ""
        lines.append(
            f"| {t['kernel']} | {t['batch']} | {t['adapters'] or ''} | {t['ms']:.4f} | {t['gbps']:.0f} | {t['bandwidth_fraction']:.0%} "
            f"| {t['same_size_copy_fraction']:.0%} | {tflops} | {t['mode']} |"
        )
    lines.append("")
    lines.append("| batch | adapters | LoRA ms (faster grid) | PARA / LoRA | IAPT / LoRA | MiLoRA / LoRA |")
    lines.append("|---|---|---|---|---|---|")
    for r in report["decode_ratios"]:
        lines.append(f"| {r['batch']} | {r['adapters']} | {r['lora_ms']:.4f} | {r['para_over_lora']:.3f} | {r['iapt_over_lora']:.3f} | {r['milora_over_lora']:.3f} |")
    return "\n".join(lines)
