"""Served adapters against the transformers reference, over HTTP on a real server.

For each method, 50 held-out prompts (task prompts, and retrieval prompts longer than the
server's 64-token scheduler chunk): the greedy answers equal the reference's, one request
at a time and with every prompt of every adapter in flight at once. Three servers, each
with prefix caching on as vLLM runs by default:

* ``mixed``: the Llama demo model with 8 prompt-aware adapters (3 IAPT, 3 PARA, 2 MiLoRA),
  4 of the LoRA family (2 stock LoRA, a FanLoRA placement, ALoRA ranks from 2 to 16) and
  the base model; with LoRA enabled, vLLM's CPU platform runs the model uncompiled;
* ``compiled``: the 8 prompt-aware adapters and the base model in vLLM's default mode,
  the forward traced once and compiled by Inductor;
* ``qwen2-eager``: the Qwen2 demo model with the same twelve kinds of adapter (made for it),
  with ``--enforce-eager``.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from conftest import LORA_FAMILY, SERVED_ADAPTERS, SERVER_ARGS
from serving_fixtures import reference_answers, save_random_adapter
from vllm_plugins.serving.process import REQUEST_SECONDS, ServerProcess, request_json
from vllm_plugins.tasks import load_task
from vllm_plugins.tasks.retrieval import make_retrieval_example

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
BASE = "demo"  # the server's --served-model-name
TASKS = ("reverse", "shift", "upper", "count")
SHORT_PER_TASK = 11
LONG_PROMPTS = 6
UNCOMPILED, TRACED_ONCE = "'mode': <CompilationMode.NONE: 0>", "'mode': <CompilationMode.DYNAMO_TRACE_ONCE: 2>"
SERVERS = {  # name -> (base model fixture, adapter directory fixture, extra vLLM arguments, compilation mode in its log)
    "mixed": ("tiny_llama", "served_adapter_dir", (), UNCOMPILED),  # the shared `server`
    "compiled": ("tiny_llama", "prompt_aware_adapter_dir", (), TRACED_ONCE),
    "qwen2-eager": ("tiny_qwen2", "qwen2_adapter_dir", ("--enforce-eager",), UNCOMPILED),
}
ALL_ADAPTERS = {"tiny_llama": "served_adapter_dir", "tiny_qwen2": "qwen2_adapter_dir"}  # every adapter, per model


def _method(model: str) -> str:
    return "base" if model == BASE else SERVED_ADAPTERS[model][0]


@pytest.fixture(scope="module")
def qwen2_adapter_dir(tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-adapters")
    for name, (method, seed) in SERVED_ADAPTERS.items():
        save_random_adapter(method, tiny_qwen2, root / name, seed)
    return root


@pytest.fixture(scope="module", params=list(SERVERS))
def served(request, server_process, tmp_path_factory):
    """(URL, the served models, the reference's answers) of one of the three servers."""
    model_fixture, dir_fixture, extra, mode = SERVERS[request.param]
    names = [name for name, (method, _) in SERVED_ADAPTERS.items()
             if dir_fixture != "prompt_aware_adapter_dir" or method not in LORA_FAMILY]
    if request.param == "mixed":
        assert mode in server_process.log.read_text()
        yield server_process.url, [BASE, *names], _references(request, model_fixture)
        return
    log = tmp_path_factory.mktemp(f"parity-{request.param}") / "server.log"
    server = ServerProcess.start(request.getfixturevalue(model_fixture), request.getfixturevalue(dir_fixture), log,
                                 *SERVER_ARGS, *extra)
    try:
        assert mode in log.read_text()  # the engine runs in the mode this server stands for
        yield server.url, [BASE, *names], _references(request, model_fixture)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    rng = random.Random(0)
    short = [e.prompt for task in TASKS for e in load_task(task).test[:SHORT_PER_TASK]]
    long = [make_retrieval_example(rng, length=150).prompt for _ in range(LONG_PROMPTS)]
    assert len(short) + len(long) >= 50
    return short + long


NEAR_TIE = 1e-4  # logits: a greedy path this close to a tie may go either way in another batch


class Reference(dict):
    """Served model -> the reference's answers to :func:`prompts`, and the (model, prompt
    index) pairs whose greedy path passes a near tie (``greedy_decode``'s margins): those
    the comparisons leave out. The reference runs in float64, so these are the model's
    near ties, the same on every CPU: in float32 the set changed with the machine's
    arithmetic (once three in one method's 50 answers, failing the quota below). The tiny
    Llama has one in 650 answers: iapt-3 on 'r z f b u #task =' scores 'a' and 'o' 1.7e-6
    apart, and the server's answer followed the batch it ran in."""

    def __init__(self):
        super().__init__()
        self.near_ties: set[tuple[str, int]] = set()

    def agree(self, jobs: list[tuple[str, int]], got: list[str]) -> None:
        """Asserts every answer off a near tie equals the reference's, and that few are on one."""
        decisive = [(job, answer) for job, answer in zip(jobs, got) if job not in self.near_ties]
        assert len(decisive) >= 0.95 * len(jobs)
        assert [answer for _, answer in decisive] == [self[model][i] for (model, i), _ in decisive]


_REFERENCES: dict[str, Reference] = {}


def _references(request, model_fixture: str) -> Reference:
    """The reference's answers to :func:`prompts` per served model, for the base model of
    ``model_fixture``; computed once per module."""
    if model_fixture not in _REFERENCES:
        model_path = request.getfixturevalue(model_fixture)
        adapters = request.getfixturevalue(ALL_ADAPTERS[model_fixture])
        prompts = request.getfixturevalue("prompts")
        reference = Reference()
        for m in [BASE, *SERVED_ADAPTERS]:
            margins: list[float] = []
            reference[m] = reference_answers(model_path, None if m == BASE else adapters / m, prompts, MAX_TOKENS, margins,
                                             torch.float64)
            reference.near_ties |= {(m, i) for i, margin in enumerate(margins) if margin < NEAR_TIE}
        _REFERENCES[model_fixture] = reference
    return _REFERENCES[model_fixture]


def _body(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def _answer(url: str, model: str, prompt: str) -> str:
    status, body = request_json(f"{url}/v1/completions", _body(model, prompt))
    assert status == 200, body
    return body["choices"][0]["text"].strip()


async def _answer_all(url: str, requests: list[tuple[str, str]], clients: int) -> list[tuple[str, float, float]]:
    """(answer, sent, answered) of every (model, prompt), ``clients`` requests in flight at
    a time from one event loop (threads would start them too slowly to overlap on a fast
    server)."""
    gate = asyncio.Semaphore(clients)
    # a connection per request: a kept-alive one that sat idle past the server's keep-alive
    # timeout (the event loop starved on a loaded machine) is closed under the next request
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=REQUEST_SECONDS, limits=limits) as client:

        async def one(model: str, prompt: str) -> tuple[str, float, float]:
            async with gate:
                sent = time.monotonic()
                reply = await client.post(f"{url}/v1/completions", json=_body(model, prompt))
                assert reply.status_code == 200, reply.text
                return reply.json()["choices"][0]["text"].strip(), sent, time.monotonic()

        return list(await asyncio.gather(*(one(model, prompt) for model, prompt in requests)))


@pytest.mark.parametrize("model_fixture", list(ALL_ADAPTERS))
def test_every_adapter_changes_the_reference_answers(request, model_fixture):
    expected = _references(request, model_fixture)
    for model, answers in expected.items():
        if model != BASE:
            assert answers != expected[BASE], model  # so a request served without its adapter would show


def test_one_request_at_a_time_matches_the_reference(served, prompts):
    url, models, expected = served
    for method in sorted({_method(m) for m in models}):
        chosen = [m for m in models if _method(m) == method]
        jobs = [(chosen[i % len(chosen)], i) for i in range(len(prompts))]  # 50 prompts per method
        expected.agree(jobs, [_answer(url, model, prompts[i]) for model, i in jobs])


def test_all_prompts_at_once_in_one_mixed_batch_match_the_reference(served, prompts):
    url, models, expected = served
    jobs = [(model, i) for model in models for i in range(len(prompts))]
    random.Random(1).shuffle(jobs)
    results = asyncio.run(_answer_all(url, [(model, prompts[i]) for model, i in jobs], clients=64))
    for method in sorted({_method(m) for m in models}):
        ours = [(job, r[0]) for job, r in zip(jobs, results) if _method(job[0]) == method]
        assert len(ours) >= 50
        expected.agree([job for job, _ in ours], [answer for _, answer in ours])
    events = sorted([(r[1], 1) for r in results] + [(r[2], -1) for r in results])
    in_flight = max(sum(step for _, step in events[: k + 1]) for k in range(len(events)))
    assert in_flight >= 32  # the requests really were served together
