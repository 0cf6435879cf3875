"""``vllm-plugins bench eviction-prefill``: prefill with and without KV eviction on a
random-weight Llama wider than the demo model, timed as ``bench eviction`` times it.

The demo model's forward pass is so small (hidden size 128, 4 layers) that a policy's
scoring, which grows with layers x heads x head_dim^2 (expected attention) or layers x
heads x window (SnapKV, NACL) per prompt token, weighs far more beside it than beside a
served model's. This bench keeps everything else of ``bench eviction`` (the retrieval
task's prompts and the demo tokenizer, the engine's settings, the timing protocol) and
swaps in a model of ``hidden`` width: ``hidden / 64`` query heads of 64 dimensions, half
as many KV heads, an MLP three times as wide, the demo model's 4 layers. Its weights are
random, so only times are reported, not accuracy.

One width per run: the engine runs in this process, and vLLM's distributed state allows
one in-process engine per process (:func:`~vllm_plugins.serving.offline.make_engine`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vllm_plugins.bench.eviction import OFF, PRESETS, _engine, _Stepper, bench_examples, time_requests
from vllm_plugins.demo_model import build_demo_model
from vllm_plugins.eviction.policies import POLICIES

HEAD_DIM = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class PrefillBench:
    hidden: int = 512
    ratios: tuple[float, ...] = (0.2, 0.5)
    prompts: int = 8
    decode_tokens: int = 2
    enforce_eager: bool = False


def wider_model(hidden: int, out: Path, seed: int = 0) -> int:
    """Write a random-weight Llama of ``hidden`` width (module docstring) with the demo
    model's tokenizer and every other setting to ``out``; its number of parameters.
    Raises ValueError unless ``hidden`` is a positive multiple of 2 x ``HEAD_DIM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden <= 0 or hidden % (2 * HEAD_DIM):
        raise ValueError(f"the width must be a positive multiple of {2 * HEAD_DIM}, got {hidden}")
    demo = build_demo_model("demo")
    config = LlamaConfig.from_pretrained(demo)
    heads = hidden // HEAD_DIM
    config.update(dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads // 2,
                       head_dim=HEAD_DIM, intermediate_size=3 * hidden))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (demo / name).exists():
            shutil.copy(demo / name, out / name)
    return sum(p.numel() for p in model.parameters())


def run_prefill_bench(bench: PrefillBench) -> dict:
    """Prefill, first decode step and TPOT medians (:class:`~.eviction.StepTimes`) of
    every policy at ``bench.ratios`` against eviction off, on the retrieval task's first
    ``bench.prompts`` prompts, after one warm-up request per configuration."""
    eviction = replace(PRESETS["default"], timing_prompts=bench.prompts, enforce_eager=bench.enforce_eager)
    prompts = [e.prompt for e in bench_examples(eviction)][: bench.prompts]
    configs = [OFF] + [(policy, ratio) for policy in sorted(POLICIES) for ratio in bench.ratios]
    with tempfile.TemporaryDirectory(prefix="vllm-plugins-wider-") as tmp:
        model = Path(tmp) / f"llama-{bench.hidden}"
        parameters = wider_model(bench.hidden, model)
        llm = _engine(eviction, model)
        # a configuration's first request compiles code for these shapes (SCA's loop: seconds)
        times = time_requests(_Stepper(llm), prompts, configs, bench.decode_tokens, warm_up=tuple(configs))
        mode = llm.llm_engine.vllm_config.compilation_config.mode.name
    off = times[OFF]
    rows = [{"policy": policy, "keep_ratio": ratio, "prefill_ms": t.prefill, "prefill_vs_off": round(t.prefill / off.prefill, 3),
             "first_decode_ms": t.first_decode, "first_decode_vs_off": round(t.first_decode / off.first_decode, 3),
             "tpot_ms": t.tpot} for (policy, ratio), t in times.items()]
    return {"bench": asdict(bench), "parameters": parameters, "prompt_words": eviction.prompt_words,
            "compilation_mode": mode, "results": rows}


def format_prefill_report(report: dict) -> str:
    bench = report["bench"]
    lines = [f"Prefill with KV eviction on a random Llama of width {bench['hidden']} ({report['parameters']:,} parameters): "
             f"{bench['prompts']} retrieval prompts of {report['prompt_words']} words, "
             f"compilation mode {report['compilation_mode']}",
             f"{'policy':<20}{'ratio':>6}{'prefill ms':>12}{'x off':>8}{'1st decode ms':>15}{'x off':>8}{'TPOT ms':>10}"]
    for r in report["results"]:
        ratio = "-" if r["keep_ratio"] is None else f"{r['keep_ratio']:.1f}"
        lines.append(f"{r['policy']:<20}{ratio:>6}{r['prefill_ms']:>12.1f}{r['prefill_vs_off']:>8.3f}"
                     f"{r['first_decode_ms']:>15.2f}{r['first_decode_vs_off']:>8.3f}{r['tpot_ms']:>10.2f}")
    return "\n".join(lines)
