"""``vllm-plugins bench decode-step``: one decode step of the whole model per method,
captured, replayed for other requests, checked and timed, without vLLM.

The step is the harness's (:mod:`vllm_plugins.decode_harness`): a Llama decoder stack
whose layers are wrapped by the plugins' own layers and fed by their runtime, as in
serving. For each number of adapters resident and each method (the base model, stock
LoRA at rank 8 on all 7 modules, PARA, IAPT, MiLoRA):

1. requests (more than the largest batch) get random prompts and adapters spread over
   the bank (request i names adapter i * max(1, adapters // requests) mod adapters, so a
   batch of B requests names min(B, adapters) of them), are prefilled through the
   runtime (which computes every prompt-aware state as serving does) and each gets its
   first token;
2. per batch size, the decode step of one batch is captured in a CUDA graph (on the CPU:
   compiled with ``torch.compile``, or run eager), then ``replays`` other batches are
   written into the persistent buffers and each replay is compared with an eager step
   over the same buffers (relative error of the logits, and whether the greedy tokens
   agree);
3. the step is timed: the median of graph replays timed with device events (on the CPU,
   wall-clock medians of eager and compiled calls).

On CUDA, stock LoRA runs vLLM's own shrink/expand Triton kernels (the real vLLM or the
carried copy, ``vllm-plugins bench carry-vllm-lora-ops``), with vLLM's default grid over
every slot and with the active-adapter grid (``specialize_active_lora``). On the CPU it
runs a torch reference of the same math, and the report says so.

A decode graph holds the work of the methods present in the batch it was captured for,
as vLLM captures LoRA graphs with and without adapters; each method's batches here hold
that method only.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.bench.device_timing import timed_median_ms
from vllm_plugins.bench.kernels import LLAMA3_8B
from vllm_plugins.decode_harness.engine import HarnessEngine, Request
from vllm_plugins.decode_harness.load import bind_runtime, build_stack
from vllm_plugins.decode_harness.lora import LoraMapping, install_lora, make_banks, remove_lora
from vllm_plugins.decode_harness.memory_adapters import MemoryAdapters, adapter_path
from vllm_plugins.decode_harness.model import StackConfig
from vllm_plugins.serving.config import PromptAdapterSettings

logger = logging.getLogger(__name__)

BASE = "base"
LORA = "lora"
LORA_ACTIVE = "lora (active-adapter grid)"
PROMPT_AWARE = ("para", "iapt", "milora")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-3}
"""Largest relative error of a replay's logits against the eager step's, by dtype."""


@dataclass(frozen=True)
class DecodePreset:
    config: StackConfig
    batches: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    prompt_len: int  # tokens per prompt; the timed step computes the token at this position
    generators: int  # distinct random adapters per prompt-aware method (memory_adapters)
    prefill_tokens: int  # tokens per prefill step
    timed_steps: int
    replays: int = 3
    block_size: int = 16
    lora_rank: int = 8
    soft_tokens: int = 4

    def num_requests(self, adapters: int) -> int:
        """A quarter more requests than the largest batch, so that replays hold others; a
        multiple of ``adapters`` when there are fewer adapters, so that every window of
        consecutive requests names min(window, adapters) adapters."""
        count = max(self.batches) * 5 // 4
        return count if adapters > count else -(-count // adapters) * adapters

    @property
    def blocks_per_request(self) -> int:
        return -(-(self.prompt_len + 1) // self.block_size)

    def num_blocks(self) -> int:
        requests = max(self.num_requests(a) for a in self.adapter_counts)
        soft_blocks = -(-requests // (self.block_size // self.soft_tokens))
        return requests * self.blocks_per_request + soft_blocks


PRESETS = {
    "tiny": DecodePreset(
        config=StackConfig(Dims(hidden=128, intermediate=384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32),
                           vocab_size=671, rope_theta=10000.0, rms_norm_eps=1e-6),
        batches=(1, 4, 16), adapter_counts=(4, 32), prompt_len=12, generators=2, prefill_tokens=256, timed_steps=10,
        replays=2,
    ),
    # 1,000 adapters first: the targets are judged there, and a run cut short keeps them.
    "8b": DecodePreset(
        config=StackConfig(LLAMA3_8B, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5),
        batches=(1, 16, 64, 256), adapter_counts=(1000, 16), prompt_len=128, generators=8, prefill_tokens=4096,
        timed_steps=30,
    ),
}


def _requests(method: str, adapters: int, preset: DecodePreset, seed: int = 0) -> list[Request]:
    """The same random prompts for every method; adapters spread over the bank."""
    count = preset.num_requests(adapters)
    gen = torch.Generator().manual_seed(seed)
    stride = max(1, adapters // count)
    requests = []
    for i in range(count):
        prompt = torch.randint(preset.config.vocab_size, (preset.prompt_len,), generator=gen).tolist()
        adapter = i * stride % adapters
        request = Request(f"{method}-{i}", prompt)
        if method in PROMPT_AWARE:
            request.adapter = (f"{method}-{adapter}", adapter_path(method, adapter))
            request.soft_tokens = preset.soft_tokens if method == "iapt" else 0
        elif method != BASE:
            request.lora_slot = adapter
        requests.append(request)
    return requests


def _windows(requests: list[Request], batch: int, replays: int) -> list[list[Request]]:
    """The captured batch and one batch per replay: ``batch`` consecutive requests from
    spread-out starts, each in a shuffled order."""
    shuffle = random.Random(batch).shuffle
    windows = []
    for k in range(replays + 1):
        start = k * len(requests) // (replays + 1)
        window = [requests[(start + j) % len(requests)] for j in range(batch)]
        shuffle(window)
        windows.append(window)
    return windows


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    finite = bool(torch.isfinite(got).all() and torch.isfinite(want).all())
    error = float((got - want).norm() / want.norm()) if finite else float("nan")
    return {"relative_error": error, "tokens_equal": bool((got.argmax(-1) == want.argmax(-1)).all())}


class GraphTimer:
    """CUDA: capture the step, replay it for other batches against eager, time replays."""

    mode = "cuda-graph"

    def __init__(self, timed_steps: int):
        self.timed_steps = timed_steps

    def measure(self, engine: HarnessEngine, windows: list[list[Request]]) -> dict:
        batch = len(windows[0])
        engine.begin_decode(windows[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, vLLM's LoRA pointer caches fill
            for _ in range(2):
                engine.decode_logits(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = engine.decode_logits(batch)
        engine.end_step()
        replays = []
        for window in windows[1:]:
            engine.begin_decode(window)
            eager = engine.decode_logits(batch)
            graph.replay()
            replays.append(_compare(logits, eager))
            engine.end_step()
        engine.begin_decode(windows[-1])
        ms = timed_median_ms(graph.replay, self.timed_steps)
        engine.end_step()
        del graph
        return {"ms": ms, "mode": self.mode, "replays": replays}


class CpuTimer:
    """CPU: time eager steps and, if asked, steps compiled with ``torch.compile`` (which
    then stand for the replays, checked against eager for other batches)."""

    def __init__(self, timed_steps: int, compile_step: bool):
        self.timed_steps = timed_steps
        self.compile_step = compile_step
        self.mode = "compiled" if compile_step else "eager"
        self._engine: HarnessEngine | None = None
        self._step = None

    def _compiled(self, engine: HarnessEngine):
        """The engine's step compiled once (a new engine, or its model with other modules,
        is compiled afresh, as a worker compiles its own model); batch sizes after the
        first two share one graph with a dynamic token count."""
        if engine is not self._engine:
            torch._dynamo.reset()
            self._engine, self._step = engine, torch.compile(engine.decode_logits)
        return self._step

    def _median_ms(self, step, batch: int) -> float:
        times = []
        for _ in range(self.timed_steps):
            start = time.perf_counter()
            step(batch)
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    def measure(self, engine: HarnessEngine, windows: list[list[Request]]) -> dict:
        batch = len(windows[0])
        eager_step = engine.decode_logits
        step = self._compiled(engine) if self.compile_step else eager_step
        engine.begin_decode(windows[0])
        step(batch)  # compiles
        engine.end_step()
        replays = []
        for window in windows[1:]:
            engine.begin_decode(window)
            replays.append(_compare(step(batch), eager_step(batch)))
            engine.end_step()
        engine.begin_decode(windows[-1])
        result = {"ms": self._median_ms(step, batch), "mode": self.mode, "replays": replays}
        if self.compile_step:
            result["eager_ms"] = self._median_ms(eager_step, batch)
        engine.end_step()
        return result


def _measure_method(engine: HarnessEngine, requests: list[Request], method: str, adapters: int,
                    preset: DecodePreset, timer) -> list[dict]:
    engine.admit(requests, preset.prompt_len + 1)
    try:
        engine.prefill(requests, preset.prefill_tokens)
        rows = []
        for batch in preset.batches:
            windows = _windows(requests, batch, preset.replays)
            named = 0 if method == BASE else len({(r.adapter, r.lora_slot) for r in windows[-1]})
            rows.append({"method": method, "adapters": adapters, "batch": batch, "distinct_adapters": named,
                         **timer.measure(engine, windows)})
            logger.info("%s, %d adapters, batch %d: %.3f ms (%s), replays' relative errors %s", method, adapters, batch,
                        rows[-1]["ms"], rows[-1]["mode"], [f"{p['relative_error']:.1e}" for p in rows[-1]["replays"]])
        return rows
    finally:
        engine.release(requests)


def _settings(preset: DecodePreset, adapters: int) -> PromptAdapterSettings:
    return PromptAdapterSettings(max_active=adapters, max_rank=8, max_soft_tokens=preset.soft_tokens,
                                 max_adapters=max(adapters, 1))


def run_decode_step_bench(preset_name: str, device: str, compile_step: bool = False,
                          on_progress: Callable[[dict], None] | None = None) -> dict:
    """Every method, adapter count and batch of the preset; the report as JSON-able dict.
    ``on_progress`` gets the report so far after each method (a run cut short keeps those).

    ValueError for an unknown preset, a device that is not there, or the 8b preset on the CPU.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU")
    if not cuda and preset_name == "8b":
        raise ValueError("the 8b preset is for a GPU (--device cuda); use --preset tiny on the CPU")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    d = preset.config.dims
    max_rows = max(preset.num_requests(a) for a in preset.adapter_counts)
    max_tokens = max(preset.prefill_tokens, max(preset.batches))
    num_blocks = preset.num_blocks()
    model, layers = build_stack(preset.config, max_tokens, preset.blocks_per_request, preset.block_size, num_blocks,
                                dtype, device, seed=0)
    adapters = MemoryAdapters(d, PROMPT_AWARE, preset.generators, seed=1)
    timer = GraphTimer(preset.timed_steps) if cuda else CpuTimer(preset.timed_steps, compile_step)
    started = time.monotonic()
    report = {
        "preset": preset_name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "mode": timer.mode,
        "lora_kernels": _lora_kernels(cuda),
        "shape": {**asdict(d), "vocab_size": preset.config.vocab_size, "prompt_len": preset.prompt_len,
                  "block_size": preset.block_size, "lora_rank": preset.lora_rank, "iapt_soft_tokens": preset.soft_tokens},
        "rows": [],
    }

    def measured(rows: list[dict]) -> None:
        report["rows"] += rows
        report["seconds"] = round(time.monotonic() - started, 1)
        if on_progress is not None:
            on_progress(report)

    for count in preset.adapter_counts:
        runtime = bind_runtime(model, layers, _settings(preset, count), "", max_tokens, max_rows, device, dtype, adapters.read)
        engine = HarnessEngine(model, runtime, None, num_blocks)
        for method in (BASE, *PROMPT_AWARE):
            if method != BASE:
                runtime.slots.activate([(f"{method}-{a}", adapter_path(method, a)) for a in range(count)])
            measured(_measure_method(engine, _requests(method, count, preset), method, count, preset, timer))
        del engine
        runtime = bind_runtime(model, layers, _settings(preset, 1), "", max_tokens, max_rows, device, dtype, adapters.read)
        _free_memory(cuda)  # the tables of the runtime just replaced (MiLoRA's slots: 42 GB at 8B and 1,000 adapters)
        banks = make_banks(model, preset.lora_rank, count, seed=2)
        for label, specialize in ((LORA, False), (LORA_ACTIVE, True))[: 2 if cuda else 1]:
            mapping = LoraMapping(count, max_tokens, device, specialize)
            install_lora(model, banks, mapping)
            try:
                engine = HarnessEngine(model, runtime, mapping, num_blocks)
                measured(_measure_method(engine, _requests(LORA, count, preset), label, count, preset, timer))
            finally:
                remove_lora(model)
        del banks, mapping, engine
        _free_memory(cuda)
    _add_ratios(report["rows"], TOLERANCE[dtype])
    report["targets"] = _targets(report["rows"], preset)
    return report


def _free_memory(cuda: bool) -> None:
    """Collect what was dropped (a runtime and its adapter slots refer to each other)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _lora_kernels(cuda: bool) -> str:
    if not cuda:
        return "torch reference of the math of vLLM's LoRA shrink/expand kernels (no GPU: vLLM's Triton kernels not run)"
    from vllm_plugins.bench.vllm_lora import load_vllm_lora_ops

    ops = load_vllm_lora_ops()
    return f"vLLM's LoRA shrink/expand Triton kernels from {'a carried copy' if ops.carried else 'vLLM'} ({ops.source})"


def _add_ratios(rows: list[dict], tolerance: float) -> None:
    base = {(r["adapters"], r["batch"]): r["ms"] for r in rows if r["method"] == BASE}
    for r in rows:
        reference = base[(r["adapters"], r["batch"])]
        r["x_base"] = r["ms"] / reference
        r["delta_ms"] = r["ms"] - reference
        r["replays_match"] = all(p["relative_error"] <= tolerance for p in r["replays"])


def _targets(rows: list[dict], preset: DecodePreset) -> list[dict]:
    """Issue 19's targets at the largest adapter count: PARA and IAPT at most 1.05x the
    base step at batch >= 16; MiLoRA at or below stock LoRA (its faster grid)."""
    most = max(preset.adapter_counts)
    by_key = {(r["method"], r["batch"]): r for r in rows if r["adapters"] == most}
    targets = []
    for batch in (b for b in preset.batches if b >= 16):
        for method in ("para", "iapt"):
            ratio = by_key[(method, batch)]["x_base"]
            targets.append({"target": f"{method} <= 1.05x base", "adapters": most, "batch": batch, "value": ratio,
                            "met": ratio <= 1.05})
    for batch in preset.batches:
        lora = min(r["ms"] for (m, b), r in by_key.items() if b == batch and m in (LORA, LORA_ACTIVE))
        ratio = by_key[("milora", batch)]["ms"] / lora
        targets.append({"target": "milora <= lora", "adapters": most, "batch": batch, "value": ratio, "met": ratio <= 1.0})
    return targets


def format_report(report: dict) -> str:
    lines = [f"{report['device']}, {report['dtype']}, {report['mode']}, preset {report['preset']} "
             f"({report['shape']['num_layers']} layers, hidden {report['shape']['hidden']}, prompt "
             f"{report['shape']['prompt_len']} tokens), {report['seconds']} s",
             f"LoRA: {report['lora_kernels']}", "",
             "| method | adapters | batch | ms / step | x base | + ms | mode | replays (max rel. error) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        worst = max((p["relative_error"] for p in r["replays"]), default=0.0)
        verdict = "match" if r["replays_match"] else "MISMATCH"
        eager = f" (eager {r['eager_ms']:.3f})" if "eager_ms" in r else ""
        lines.append(f"| {r['method']} | {r['adapters']} | {r['batch']} | {r['ms']:.3f}{eager} | {r['x_base']:.3f} "
                     f"| {r['delta_ms']:+.3f} | {r['mode']} | {verdict} ({worst:.1e}) |")
    lines += ["", "| target | adapters | batch | value | met |", "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['adapters']} | {t['batch']} | {t['value']:.3f} | {'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    return "\n".join(lines)
