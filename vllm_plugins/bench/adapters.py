"""``vllm-plugins bench adapters``: what each adapter method costs a vLLM engine, against
the base model, measured one engine per method in one run.

Each method gets ``adapters`` distinct random adapters on a random-initialised Llama and
the same closed-loop load (:mod:`.latency`): ``concurrency`` clients, prompts of
``prompt_tokens`` random token ids, ``output_tokens`` generated tokens per request (EOS
ignored), request i naming adapter i mod ``adapters``. Methods: ``base`` (no adapter),
``lora`` (rank 8 on all seven linear modules, vLLM's LoRA), ``fanlora`` (rank 8 on two
modules per layer, vLLM's LoRA), and the prompt-aware ``iapt``, ``para``, ``milora``
(this project's worker). Every engine runs in vLLM's default mode (on the CPU: the
forward traced once and compiled, except with stock LoRA, where vLLM's CPU platform turns
compilation off), or all eager with ``enforce_eager``; the report gives each engine's
mode. Float32, prefix caching on (random prompts never hit it).
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vllm_plugins import paths
from vllm_plugins.adapters.common.model_parts import ATTENTION_MODULES, LINEAR_MODULES
from vllm_plugins.adapters.fanlora.placement import select_placement
from vllm_plugins.adapters.lora import LoraSettings
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import MANIFEST, describe_base, save_adapter
from vllm_plugins.bench.latency import Job, run_closed_loop
from vllm_plugins.bench.model import LLAMA_125M, LLAMA_TINY, RandomLlama, build_random_llama
from vllm_plugins.serving.tickets import adapter_args
from vllm_plugins.serving.config import SECTION

logger = logging.getLogger(__name__)

BENCH_METHODS = ("base", "lora", "fanlora", "iapt", "para", "milora")
NOISE = 0.02  # random adapters: initialisation plus N(0, NOISE^2) on every trainable weight


@dataclass(frozen=True)
class AdapterBench:
    model: RandomLlama
    adapters: int = 16
    concurrency: int = 32
    requests: int = 64
    prompt_tokens: int = 256
    output_tokens: int = 128
    lora_rank: int = 8
    fanlora_modules_per_layer: int = 2
    seed: int = 0
    enforce_eager: bool = False


PRESETS = {
    "default": AdapterBench(LLAMA_125M),
    "tiny": AdapterBench(LLAMA_TINY, adapters=2, concurrency=4, requests=8, prompt_tokens=32, output_tokens=8),
}


# -- adapters -------------------------------------------------------------------------
def _module_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if name in ATTENTION_MODULES else 'mlp'}.{name}"


def _settings(method: str, bench: AdapterBench) -> tuple[object, LoraSettings | None]:
    """(manifest config, LoRA settings) of ``method``'s adapters in this benchmark."""
    spec = METHODS[method]
    if method == "lora":
        settings = LoraSettings(rank=bench.lora_rank)
        return settings, settings
    if method == "fanlora":
        # FanLoRA's placement shape (k of 7 modules per layer) with seeded random scores:
        # which modules are kept changes the cost little; how many is what FanLoRA saves.
        rng = random.Random(bench.seed)
        scores = {_module_path(i, n): rng.random() for i in range(bench.model.layers) for n in LINEAR_MODULES}
        placement = select_placement(scores, bench.fanlora_modules_per_layer)
        config = spec.config_cls(modules_per_layer=bench.fanlora_modules_per_layer, rank=bench.lora_rank)
        return config, LoraSettings(rank=bench.lora_rank, placement=placement)
    return spec.config_cls(), None


def random_adapters(method: str, bench: AdapterBench, model_path: Path) -> list[Path]:
    """``bench.adapters`` distinct adapters of ``method`` (written once, then reused)."""
    from transformers import AutoModelForCausalLM

    root = paths.home() / "bench" / "adapters" / bench.model.name / f"{method}-{bench.adapters}"
    dirs = [root / f"{method}-{i}" for i in range(bench.adapters)]
    if all((d / MANIFEST).exists() for d in dirs):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    logger.info(f"writing {bench.adapters} random {method} adapters in {root}")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base_info = describe_base(base, model_path)
    config, lora_settings = _settings(method, bench)
    lm = METHODS[method].build(base, lora_settings or config)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    for i, out in enumerate(dirs):
        gen = torch.Generator().manual_seed(bench.seed * 1000 + i)
        with torch.no_grad():
            for p, p0 in zip(trainable, initial):
                p.copy_(p0 + NOISE * torch.randn(p.shape, generator=gen))
        save_adapter(out, method, config, lm, base_info, lora_settings=lora_settings)
    return dirs


# -- engines and load -----------------------------------------------------------------
def _engine_args(method: str, bench: AdapterBench, model_path: Path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_plugins.serving.launcher import CPU_WORKER, SCHEDULER

    args = {
        "model": str(model_path),
        "skip_tokenizer_init": True,
        "enforce_eager": bench.enforce_eager,
        "dtype": "float32",
        "max_model_len": bench.prompt_tokens + bench.output_tokens,
        "max_num_seqs": bench.concurrency,
        "seed": 0,
    }
    if method in ("lora", "fanlora"):
        args |= {"enable_lora": True, "max_loras": bench.adapters, "max_lora_rank": bench.lora_rank}
    elif method != "base":
        args |= {
            "worker_cls": CPU_WORKER,
            "scheduler_cls": SCHEDULER,
            "additional_config": {SECTION: {"max_active": bench.adapters}},
        }
    return AsyncEngineArgs(**args)


def _jobs(method: str, bench: AdapterBench, adapter_dirs: list[Path], count: int, offset: int) -> list[Job]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    rng = random.Random(bench.seed + offset)
    jobs = []
    for i in range(count):
        prompt = [rng.randrange(3, bench.model.vocab) for _ in range(bench.prompt_tokens)]
        extra, lora = None, None
        if method != "base":
            path = adapter_dirs[i % len(adapter_dirs)]
            if METHODS[method].family == "lora":
                lora = LoRARequest(path.name, 1 + i % len(adapter_dirs), str(path))
            else:
                extra = adapter_args(path.name, str(path))
        params = SamplingParams(
            temperature=0.0, max_tokens=bench.output_tokens, ignore_eos=True, detokenize=False, extra_args=extra
        )
        jobs.append(Job(prompt, params, lora))
    return jobs


RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "tpot_mean_ms", "output_tokens_per_s")


def run_adapter_bench(bench: AdapterBench, methods: tuple[str, ...] = BENCH_METHODS) -> dict:
    """Figures per method and each one's ratio to base.

    The machine's speed drifts over a run, so base is measured first and again last, and
    every ratio is taken against the mean of the two base runs (both are reported).
    """
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_path = build_random_llama(bench.model)
    order = ["base", *[m for m in methods if m != "base"], "base"]
    runs: list[tuple[str, dict]] = []
    for method in order:
        dirs = [] if method == "base" else random_adapters(method, bench, model_path)
        warmup = _jobs(method, replace(bench, output_tokens=2), dirs, max(bench.adapters, bench.concurrency), offset=1)
        jobs = _jobs(method, bench, dirs, bench.requests, offset=2)
        logger.info(f"{method}: {len(jobs)} requests, concurrency {bench.concurrency}")
        figures = run_closed_loop(_engine_args(method, bench, model_path), warmup, jobs, bench.concurrency)
        logger.info(f"{method}: TPOT p50 {figures['tpot_p50_ms']:.1f} ms, p99 {figures['tpot_p99_ms']:.1f} ms")
        runs.append((method, figures))
    base_runs = [f for m, f in runs if m == "base"]
    base = {key: sum(f[key] for f in base_runs) / len(base_runs) for key in RATIO_KEYS}
    results = {"base": {**base, "requests": base_runs[0]["requests"], "compilation_mode": base_runs[0]["compilation_mode"],
                        "runs": base_runs}}
    results |= {m: f for m, f in runs if m != "base"}
    for figures in results.values():
        figures["ratio_to_base"] = {key: figures[key] / base[key] for key in RATIO_KEYS}
    return {
        "settings": asdict(bench),
        "model_parameters": bench.model.num_parameters(),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "methods": results,
    }


def format_table(report: dict) -> str:
    rows = [
        f"{'method':8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'tok/s':>8}"
        f" {'TPOT p50/base':>14} {'TPOT p99/base':>14} {'tok/s/base':>11}  mode"
    ]
    for method, f in report["methods"].items():
        r = f["ratio_to_base"]
        rows.append(
            f"{method:8} {f['ttft_p50_ms']:8.0f}ms {f['ttft_p99_ms']:8.0f}ms {f['tpot_p50_ms']:8.1f}ms"
            f" {f['tpot_p99_ms']:8.1f}ms {f['output_tokens_per_s']:8.1f} {r['tpot_p50_ms']:14.3f}"
            f" {r['tpot_p99_ms']:14.3f} {r['output_tokens_per_s']:11.3f}  {f['compilation_mode']}"
        )
    return "\n".join(rows)
