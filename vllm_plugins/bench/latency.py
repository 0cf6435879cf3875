"""Closed-loop latency of one vLLM engine: ``concurrency`` clients, each sending its
requests one after another, every request streamed token by token.

Per request: TTFT (submission to first token) and TPOT (time per output token after the
first: (last - first) / (tokens - 1)). Per run: their p50 and p99, and output tokens per
second over the whole run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Job:
    """One request: prompt token ids, sampling parameters, and an optional LoRA request."""

    prompt_token_ids: list[int]
    params: Any  # vllm.SamplingParams
    lora_request: Any = None


@dataclass(frozen=True)
class Timing:
    submitted: float
    first_token: float
    last_token: float
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.submitted

    @property
    def tpot(self) -> float:
        return (self.last_token - self.first_token) / max(1, self.output_tokens - 1)


def summarize(timings: list[Timing], wall_seconds: float) -> dict[str, float]:
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings]
    return {
        "requests": len(timings),
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "tpot_p50_ms": 1e3 * float(np.percentile(tpot, 50)),
        "tpot_p99_ms": 1e3 * float(np.percentile(tpot, 99)),
        "tpot_mean_ms": 1e3 * statistics.fmean(tpot),
        "output_tokens_per_s": sum(t.output_tokens for t in timings) / wall_seconds,
        "wall_s": wall_seconds,
    }


async def _stream(engine, job: Job) -> Timing:
    from vllm.inputs import TokensPrompt

    submitted = time.perf_counter()
    first = last = None
    tokens = 0
    request = TokensPrompt(prompt_token_ids=job.prompt_token_ids)
    async for out in engine.generate(request, job.params, uuid.uuid4().hex, lora_request=job.lora_request):
        now = time.perf_counter()
        tokens = len(out.outputs[0].token_ids)
        if first is None and tokens:
            first = now
        last = now
    if first is None:
        raise RuntimeError("a request finished without output tokens")
    return Timing(submitted, first, last, tokens)


async def _closed_loop(engine, jobs: list[Job], concurrency: int) -> list[Timing]:
    queue = list(reversed(jobs))
    timings: list[Timing] = []

    async def client() -> None:
        while queue:
            timings.append(await _stream(engine, queue.pop()))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings


def run_closed_loop(engine_args, warmup: list[Job], jobs: list[Job], concurrency: int) -> dict[str, float | str]:
    """Start an engine, run ``warmup`` (not timed), then ``jobs``; the engine is shut down
    after. The figures of :func:`summarize`, and the engine's ``compilation_mode`` (vLLM's
    ``CompilationMode`` name: ``NONE`` is eager)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run() -> dict[str, float]:
        engine = AsyncLLM.from_engine_args(engine_args)
        try:
            await _closed_loop(engine, warmup, concurrency)
            start = time.perf_counter()
            timings = await _closed_loop(engine, jobs, concurrency)
            figures = summarize(timings, time.perf_counter() - start)
            return {**figures, "compilation_mode": engine.vllm_config.compilation_config.mode.name}
        finally:
            engine.shutdown()

    return asyncio.run(run())
