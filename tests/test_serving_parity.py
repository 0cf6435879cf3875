"""Served adapters against the transformers reference, over HTTP on a real server.

For each method, 50 held-out prompts (task prompts, and retrieval prompts longer than the
server's 64-token scheduler chunk): the greedy answers equal the reference's, one request
at a time and with every prompt of every adapter in flight at once, in a mix of 8
prompt-aware adapters (3 IAPT, 3 PARA, 2 MiLoRA), 2 stock LoRA adapters and the base
model. The server runs with prefix caching on, as vLLM does by default.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import SERVED_ADAPTERS
from serving_fixtures import reference_answers
from vllm_plugins.serving.process import request_json
from vllm_plugins.tasks import load_task
from vllm_plugins.tasks.retrieval import make_retrieval_example

MAX_TOKENS = 8
BASE = "demo"  # the server's --served-model-name
TASKS = ("reverse", "shift", "upper", "count")
SHORT_PER_TASK = 11
LONG_PROMPTS = 6
METHODS = ("iapt", "para", "milora", "lora", "base")


def _method(model: str) -> str:
    return "base" if model == BASE else SERVED_ADAPTERS[model][0]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    rng = random.Random(0)
    short = [e.prompt for task in TASKS for e in load_task(task).test[:SHORT_PER_TASK]]
    long = [make_retrieval_example(rng, length=150).prompt for _ in range(LONG_PROMPTS)]
    assert len(short) + len(long) >= 50
    return short + long


@pytest.fixture(scope="module")
def expected(tiny_llama, served_adapter_dir, prompts) -> dict[str, list[str]]:
    models = [BASE, *SERVED_ADAPTERS]
    return {
        m: reference_answers(tiny_llama, None if m == BASE else served_adapter_dir / m, prompts, MAX_TOKENS)
        for m in models
    }


def _answer(url: str, model: str, prompt: str) -> tuple[str, float, float]:
    start = time.monotonic()
    status, body = request_json(
        f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    )
    assert status == 200, body
    return body["choices"][0]["text"].strip(), start, time.monotonic()


def test_every_adapter_changes_the_reference_answers(expected):
    for model, answers in expected.items():
        if model != BASE:
            assert answers != expected[BASE], model  # so a request served without its adapter would show


def test_one_request_at_a_time_matches_the_reference(server, prompts, expected):
    for method in METHODS:
        models = [m for m in expected if _method(m) == method]
        jobs = [(models[i % len(models)], i) for i in range(len(prompts))]  # 50 prompts per method
        got = [_answer(server, model, prompts[i])[0] for model, i in jobs]
        assert got == [expected[model][i] for model, i in jobs], method


def test_all_prompts_at_once_in_one_mixed_batch_match_the_reference(server, prompts, expected):
    jobs = [(model, i) for model in expected for i in range(len(prompts))]
    random.Random(1).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda job: _answer(server, job[0], prompts[job[1]]), jobs))
    for method in METHODS:
        got = [r[0] for (model, i), r in zip(jobs, results) if _method(model) == method]
        want = [expected[model][i] for model, i in jobs if _method(model) == method]
        assert len(got) >= 50 and got == want, method
    events = sorted([(r[1], 1) for r in results] + [(r[2], -1) for r in results])
    in_flight = max(sum(step for _, step in events[: k + 1]) for k in range(len(events)))
    assert in_flight >= 32  # the requests really were served together
