"""``vllm-plugins bench eviction``: KV eviction on the demo model's long-context retrieval
task, every policy at several keep ratios against eviction off, in one run and one engine.

Two tasks (:data:`TASKS`): ``retrieval``, contexts holding the facts of a few keys, and
``crowded-retrieval``, contexts holding the facts of every key of the vocabulary, more
facts than keep ratio 0.1 keeps, so that a policy must use the question to keep the asked
key's.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its
scheduler and block pool can be read directly. It has a fixed KV cache of
``cache_blocks`` blocks of ``block_size`` tokens, a scheduler budget of four whole
prompts per step, and prefix caching off (the same prompts are sent under every configuration; a
prefix hit would flatter eviction off). For each configuration:

* **accuracy**: greedy answers to ``accuracy_prompts`` questions (four facts each): the
  share of answer facts right, and of answers entirely right;
* **later facts kept**: of the facts an answer's second to fourth tokens copy (the first
  is written before eviction), the share each (layer, KV head) kept, read from the
  worker's record of its choices; the report shows the best-keeping head;
* **blocks after prefill**: the KV blocks one request holds in vLLM's block pool once its
  prefill step has run (its first token sampled, its leading blocks freed);
* **most running**: ``concurrency_requests`` requests sent at once, each decoding
  ``decode_tokens`` tokens: the largest number the scheduler ran in one step;
* **prefill, first decode step and TPOT**: ``timing_prompts`` requests one at a time,
  stepped by hand: the prefill step's time (the request's time to first token in the
  engine, the query capture included), the first decode step's (which runs the eviction
  at its head: the policy's choice and the compaction, :mod:`vllm_plugins.serving.kv_eviction`)
  and the mean decode step's, that first one included. Prompts are interleaved across
  configurations so that machine drift hits all alike.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from vllm_plugins.demo_model import build_demo_model
from vllm_plugins.eviction.policies import POLICIES
from vllm_plugins.serving import openmp
from vllm_plugins.tasks.retrieval import NUM_KEYS, RetrievalExample, make_retrieval_example

logger = logging.getLogger(__name__)

OFF = ("off", None)
CROWDED_WORDS = 500  # crowded contexts at most: keep 0.1 then keeps 55 of 503 tokens, fewer than their 64 facts


@dataclass(frozen=True)
class BenchTask:
    """What a bench task's contexts hold: the facts of ``num_keys`` keys (None: a few,
    :func:`~vllm_plugins.tasks.retrieval.keys_in_context`), in at most ``max_words``
    words (None: any length)."""

    num_keys: int | None = None
    max_words: int | None = None


TASKS = {"retrieval": BenchTask(), "crowded-retrieval": BenchTask(num_keys=NUM_KEYS, max_words=CROWDED_WORDS)}


@dataclass(frozen=True)
class EvictionBench:
    preset: str = "demo"
    task: str = "retrieval"  # a key of TASKS
    prompt_words: int = 1000  # plus the question and <bos>: 1,003 tokens
    ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    accuracy_prompts: int = 100
    timing_prompts: int = 48  # a ratio of two medians moved by up to 0.08 between runs with 16
    concurrency_requests: int = 64
    decode_tokens: int = 32
    block_size: int = 32
    cache_blocks: int = 256
    seed: int = 0
    enforce_eager: bool = False  # default: vLLM's default mode (compiled on the CPU)


PRESETS = {
    "default": EvictionBench(),
    "tiny": EvictionBench(preset="tiny", prompt_words=300, ratios=(0.2,), accuracy_prompts=4, timing_prompts=2,
                          concurrency_requests=12, decode_tokens=16, cache_blocks=64),
}


def with_task(bench: EvictionBench, task: str) -> EvictionBench:
    """``bench`` asking ``task``'s questions, its contexts cut to the task's longest."""
    words = TASKS[task].max_words
    return replace(bench, task=task, prompt_words=bench.prompt_words if words is None else min(words, bench.prompt_words))


def _configs(bench: EvictionBench) -> list[tuple[str, float | None]]:
    return [OFF] + [(policy, ratio) for policy in sorted(POLICIES) for ratio in bench.ratios]


def _params(config: tuple[str, float | None], max_tokens: int, seed: int = 0):
    from vllm import SamplingParams

    policy, ratio = config
    xargs = None if ratio is None else {"kv_eviction": policy, "kv_keep_ratio": ratio}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, seed=seed, extra_args=xargs)


def _engine(bench: EvictionBench, model: Path | None = None):
    """The bench's in-process engine, on ``model`` (default: the bench's demo model)."""
    from vllm_plugins.serving.launcher import CPU_WORKER, SCHEDULER
    from vllm_plugins.serving.offline import make_engine

    tokens = bench.prompt_words + 16 + bench.decode_tokens
    return make_engine(
        model or build_demo_model(bench.preset), in_process=True, worker_cls=CPU_WORKER, scheduler_cls=SCHEDULER,
        block_size=bench.block_size, num_gpu_blocks_override=bench.cache_blocks, max_model_len=tokens,
        max_num_batched_tokens=4 * tokens, enable_chunked_prefill=True, enable_prefix_caching=False,
        enforce_eager=bench.enforce_eager,
    )


class _Stepper:
    """Requests added to the in-process engine and stepped by hand."""

    def __init__(self, llm):
        self.engine = llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self._next = 0

    def add(self, prompt: str, params) -> str:
        req_id = f"bench-{self._next}"
        self._next += 1
        self.engine.add_request(req_id, prompt, params)
        return req_id

    def internal_id(self, req_id: str) -> str:
        return _engine_request_id(self.scheduler.requests, req_id)

    def step(self) -> tuple[float, list]:
        start = time.perf_counter()
        outputs = self.engine.step()
        return time.perf_counter() - start, outputs

    def drain(self) -> int:
        """Steps until nothing is left; the most requests running in one step."""
        most = 0
        while self.engine.has_unfinished_requests():
            self.step()
            most = max(most, len(self.scheduler.running))
        return most


def score_answers(answers: list[str], expected: list[str]) -> tuple[float, float]:
    """(share of answer facts right, share of answers entirely right): an answer's facts
    are its whitespace-separated words, compared with the expected ones in order."""
    right = whole = 0
    for got, want in zip(answers, expected):
        got_facts, want_facts = got.split(), want.split()
        hits = sum(g == w for g, w in zip(got_facts, want_facts))
        right += hits
        whole += hits == len(want_facts)
    total = sum(len(w.split()) for w in expected)
    return right / total, whole / len(expected)


def _later_facts_kept(llm, outputs, examples) -> list[list[float]]:
    """Per layer and KV head, the share of the answers' later facts (those the second to
    fourth answer tokens copy, after eviction) that its kept tokens include."""
    kept_by_request = dict(llm.collective_rpc("kv_eviction_kept")[0])
    shares = None
    for output, example in zip(outputs, examples):
        kept = kept_by_request[_engine_request_id(kept_by_request, output.request_id)]
        later = [1 + i for i in example.answer_positions(example.questions[0])[1:]]  # token positions, after <bos>
        hits = [[sum(p in head_set for p in later) / len(later) for head_set in map(set, layer)] for layer in kept]
        shares = hits if shares is None else [[a + b for a, b in zip(x, y)] for x, y in zip(shares, hits)]
    return [[round(s / len(examples), 3) for s in layer] for layer in shares]


def _engine_request_id(ids, request_id: str) -> str:
    """Among ``ids``, the engine core's id of the request the front end called ``request_id``."""
    return next(r for r in ids if r == request_id or r.startswith(request_id + "-"))


def _blocks_after_prefill(stepper: _Stepper, prompt: str, config) -> int:
    req_id = stepper.add(prompt, _params(config, max_tokens=2))
    internal = stepper.internal_id(req_id)
    request = stepper.scheduler.requests[internal]
    while request.num_computed_tokens < request.num_prompt_tokens:
        stepper.step()
    held = stepper.scheduler.block_release.blocks_held(internal)
    stepper.drain()
    return held


class StepTimes(NamedTuple):
    """One request's step times in milliseconds: ``prefill`` (the step that computes its
    prompt and samples its first token), ``first_decode`` (the next, which runs its
    eviction first) and ``tpot`` (the mean of its decode steps, the first included)."""

    prefill: float
    first_decode: float
    tpot: float


def _timed_request(stepper: _Stepper, prompt: str, config, decode_tokens: int) -> StepTimes:
    """One request alone, ``decode_tokens`` >= 2."""
    stepper.add(prompt, _params(config, max_tokens=decode_tokens))
    prefill, _ = stepper.step()
    decode = []
    while stepper.engine.has_unfinished_requests():
        seconds, _ = stepper.step()
        decode.append(seconds)
    return StepTimes(1000 * prefill, 1000 * decode[0], 1000 * statistics.mean(decode))


def time_requests(stepper: _Stepper, prompts: list[str], configs: list, decode_tokens: int,
                  warm_up: tuple = (OFF,)) -> dict:
    """Per configuration, :class:`StepTimes`: the medians over ``prompts``,
    each run alone under every configuration in turn (interleaved, so that the machine's
    drift hits all alike), after one warm-up request under each of ``warm_up``."""
    timings: dict = {config: [] for config in configs}
    for config in warm_up:
        _timed_request(stepper, prompts[0], config, decode_tokens)
    for prompt in prompts:
        for config in configs:
            timings[config].append(_timed_request(stepper, prompt, config, decode_tokens))
    return {config: StepTimes(*(round(statistics.median(column), 2) for column in zip(*times)))
            for config, times in timings.items()}


def bench_examples(bench: EvictionBench) -> list[RetrievalExample]:
    """The ``accuracy_prompts`` examples of ``bench.task`` the bench asks (the first of them
    also serve the timing and concurrency runs)."""
    rng = random.Random(bench.seed)
    num_keys = TASKS[bench.task].num_keys
    return [make_retrieval_example(rng, bench.prompt_words, num_keys=num_keys) for _ in range(bench.accuracy_prompts)]


def answer_tokens(example: RetrievalExample) -> int:
    """Tokens generated for an accuracy answer: one per fact."""
    return len(example.questions[0].facts)


def run_eviction_bench(bench: EvictionBench) -> dict:
    examples = bench_examples(bench)
    prompts = [e.prompt for e in examples]
    llm = _engine(bench)
    stepper = _Stepper(llm)
    configs = _configs(bench)
    rows = {config: {"policy": config[0], "keep_ratio": config[1]} for config in configs}

    for config in configs:
        outputs = llm.generate(prompts, _params(config, max_tokens=answer_tokens(examples[0])), use_tqdm=False)
        facts, whole = score_answers([o.outputs[0].text for o in outputs], [e.answer for e in examples])
        rows[config].update(fact_accuracy=round(facts, 4), answer_accuracy=round(whole, 4))
        if config != OFF:
            rows[config]["later_facts_kept"] = _later_facts_kept(llm, outputs, examples)
        rows[config]["blocks_after_prefill"] = _blocks_after_prefill(stepper, prompts[0], config)
        for i in range(bench.concurrency_requests):
            stepper.add(prompts[i % len(prompts)], _params(config, max_tokens=bench.decode_tokens))
        rows[config]["most_running"] = stepper.drain()
        logger.info(f"{config[0]} {config[1]}: {rows[config]}")

    for config, times in time_requests(stepper, prompts[: bench.timing_prompts], configs, bench.decode_tokens).items():
        rows[config].update(prefill_ms=times.prefill, first_decode_ms=times.first_decode, tpot_ms=times.tpot)

    off = rows[OFF]
    for row in rows.values():
        row["blocks_vs_off"] = round(row["blocks_after_prefill"] / off["blocks_after_prefill"], 3)
        row["running_vs_off"] = round(row["most_running"] / off["most_running"], 2)
        row["prefill_vs_off"] = round(row["prefill_ms"] / off["prefill_ms"], 3)
        row["first_decode_vs_off"] = round(row["first_decode_ms"] / off["first_decode_ms"], 3)
        row["tpot_vs_off"] = round(row["tpot_ms"] / off["tpot_ms"], 3)
    prompt_tokens = len(llm.get_tokenizer()(prompts[0]).input_ids)
    mode = llm.llm_engine.vllm_config.compilation_config.mode.name
    return {"bench": asdict(bench), "compilation_mode": mode, "prompt_tokens": prompt_tokens,
            "openmp_environment": {k: os.environ.get(k) for k in (openmp.SPIN_ENV, openmp.WAIT_POLICY_ENV)},
            "results": list(rows.values())}


def format_report(report: dict) -> str:
    lines = [
        f"KV eviction on the {report['bench'].get('task', 'retrieval')} task: {report['prompt_tokens']}-token prompts, "
        f"{report['bench']['cache_blocks']} blocks of {report['bench']['block_size']} tokens, "
        f"compilation mode {report['compilation_mode']}",
        f"{'policy':<14}{'ratio':>6}{'facts':>8}{'answers':>8}{'blocks':>8}{'x off':>7}{'running':>8}{'x off':>7}"
        f"{'prefill ms':>11}{'x off':>7}{'1st decode ms':>14}{'x off':>7}{'TPOT ms':>9}{'x off':>7}{'facts kept':>11}",
    ]
    for r in report["results"]:
        ratio = "-" if r["keep_ratio"] is None else f"{r['keep_ratio']:.1f}"
        facts = max(max(layer) for layer in r["later_facts_kept"]) if "later_facts_kept" in r else 1.0
        lines.append(
            f"{r['policy']:<14}{ratio:>6}{r['fact_accuracy']:>8.3f}{r['answer_accuracy']:>8.3f}"
            f"{r['blocks_after_prefill']:>8}{r['blocks_vs_off']:>7.2f}{r['most_running']:>8}{r['running_vs_off']:>7.2f}"
            f"{r['prefill_ms']:>11.1f}{r['prefill_vs_off']:>7.2f}{r['first_decode_ms']:>14.2f}{r['first_decode_vs_off']:>7.2f}"
            f"{r['tpot_ms']:>9.2f}{r['tpot_vs_off']:>7.2f}{facts:>11.2f}"
        )
    return "\n".join(lines)
