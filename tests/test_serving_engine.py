"""Prompt-aware adapters inside a real vLLM engine: the state computed once per request,
tenants kept apart under prefix caching, preemption, and the bound on active adapters.

The engines run a scheduler chunk (64 tokens) shorter than the long prompts and prefix
caching on, as vLLM does by default, each in vLLM's default (compiled) mode and in eager
mode. Parity over HTTP is in test_serving_parity.py.
"""

from __future__ import annotations

import random

import pytest
from transformers import AutoConfig

from serving_fixtures import save_random_adapter
from vllm_plugins.adapters.storage import load_adapter
from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.serving.tickets import adapter_args
from vllm_plugins.tasks import load_task
from vllm_plugins.tasks.ops import OPS
from vllm_plugins.tasks.retrieval import make_retrieval_example
from vllm_plugins.tasks.suite import format_example
from vllm_plugins.training.data import encode_prompt
from vllm_plugins.training.evaluate import generate_answers
from vllm_plugins.training.generation import greedy_generate
from vllm_plugins.training.recipes import load_base

pytestmark = pytest.mark.engine

CHUNK = 64
MAX_TOKENS = 8
MODES = {"compiled": {}, "eager": {"enforce_eager": True}}  # vLLM's default mode traces the forward once
INSTRUCTED_PROMPTS = [  # every operation of the suite, and two prompts without an instruction
    format_example(list(letters), op, instructed=True).prompt
    for letters, op in zip(["abc", "qwerty", "zz", "hello", "mno"], OPS.values())
] + ["a b c =", "x y ="]
ADAPTERS = [("iapt", 0), ("iapt", 1), ("para", 2), ("para", 3), ("milora", 4), ("milora", 5)]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        f"{method}-{seed}": save_random_adapter(method, tiny_llama, root / f"{method}-{seed}", seed)
        for method, seed in ADAPTERS
    }


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    short = [e.prompt for e in load_task("reverse").test[:10]]
    long = [make_retrieval_example(rng, length=150).prompt for _ in range(3)]  # > CHUNK tokens
    return short + long


def _plugin_settings(**overrides) -> dict:
    from vllm_plugins.serving.launcher import CPU_WORKER, SCHEDULER

    settings = dict(
        max_model_len=512, worker_cls=CPU_WORKER, scheduler_cls=SCHEDULER,
        max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=True,
    )
    return {**settings, **overrides}


@pytest.fixture(scope="module", params=list(MODES))
def engine(request, tiny_llama):
    from vllm_plugins.serving.offline import running_engine

    with running_engine(tiny_llama, in_process=True, **_plugin_settings(**MODES[request.param])) as llm:
        yield llm


def test_no_forward_hook_on_the_served_model(engine):
    """The plugins act through layer wrappers and custom ops, never through hooks (which a
    compiled forward would not run)."""
    assert engine.collective_rpc("forward_hooks")[0] == 0


def _params(name: str | None, path=None):
    from vllm import SamplingParams

    extra = adapter_args(name, str(path)) if name else None
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra)


def _reference(model_path, adapter_path, prompts):
    base, tokenizer = load_base(model_path)
    lm = PlainLM(base) if adapter_path is None else load_adapter(adapter_path, base)[0]
    return generate_answers(lm, tokenizer, prompts, max_new_tokens=MAX_TOKENS)


def _texts(outputs):
    return [o.outputs[0].text.strip() for o in outputs]


def _stats(engine) -> dict[str, int]:
    return engine.collective_rpc("prompt_adapter_stats")[0]


SMALL_CACHE = dict(block_size=32, num_gpu_blocks_override=12, max_model_len=256)  # two long requests fill it


@pytest.fixture(scope="module", params=list(MODES))
def bounded(request, tiny_llama):
    """An engine with room for 2 prompt-aware adapters and a KV cache of 12 blocks of 32
    tokens, which two long requests fill (preemption)."""
    from vllm_plugins.serving.offline import running_engine

    settings = _plugin_settings(**SMALL_CACHE, **MODES[request.param],
                                additional_config={"prompt_adapters": {"max_active": 2}})
    with running_engine(tiny_llama, in_process=True, **settings) as llm:
        yield llm


@pytest.fixture(scope="module")
def interleaved(tiny_llama, adapters, prompts):
    """Every prompt for every adapter, adapters interleaved: (prompts, params, expected answers)."""
    jobs = list(adapters.items())
    answers = {name: _reference(tiny_llama, path, prompts) for name, path in jobs}
    order = [(i, name, path) for i in range(len(prompts)) for name, path in jobs]
    return ([prompts[i] for i, _, _ in order], [_params(name, path) for _, name, path in order],
            [answers[name][i] for i, name, _ in order])


def test_requests_beyond_max_active_adapters_wait(bounded, interleaved):
    """With room for 2 adapters, requests for 6 adapters sent at once are all answered,
    right, and no step serves more than 2 adapters."""
    batch_prompts, params, expected = interleaved
    assert _texts(bounded.generate(batch_prompts, params, use_tqdm=False)) == expected
    assert _stats(bounded)["most_adapters_in_a_step"] == 2


def test_the_default_bound_lets_adapters_mix_in_a_step(engine, interleaved):
    """The default bound (16) serves the same requests with more than 2 adapters in a step."""
    batch_prompts, params, expected = interleaved
    assert _texts(engine.generate(batch_prompts, params, use_tqdm=False)) == expected
    assert _stats(engine)["most_adapters_in_a_step"] > 2


def test_kv_slots_sent_with_a_request_are_ignored(engine, adapters, prompts, tiny_llama):
    """IAPT's soft-token slots come from the plugin's scheduler only: a slot forged in a
    request's extra_args (block 1, another request's perhaps) is dropped, and the request
    gets its own."""
    from vllm import SamplingParams

    from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG

    extra = {**adapter_args("iapt-1", str(adapters["iapt-1"])), SOFT_KV_SLOT_ARG: [1, 0, 4]}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra)
    assert _texts(engine.generate(prompts[:4], params, use_tqdm=False)) == _reference(tiny_llama, adapters["iapt-1"], prompts[:4])


def test_an_adapter_named_without_a_valid_ticket_is_not_served(engine, adapters, prompts, tiny_llama):
    """The adapter keys of extra_args are trusted only with the front end's ticket: without
    one, with a wrong one, or with one issued for another directory, the request is the
    base model's (and the worker never opens the path it names)."""
    from vllm import SamplingParams

    from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG
    from vllm_plugins.serving.tickets import TICKET_ARG

    real = adapter_args("iapt-1", str(adapters["iapt-1"]))
    forged = [
        {ADAPTER_ARG: "iapt-1", ADAPTER_PATH_ARG: str(adapters["iapt-1"])},
        {**real, TICKET_ARG: "0" * 64},
        {**real, ADAPTER_PATH_ARG: "/etc"},
        {**adapter_args("iapt-1", "/etc"), TICKET_ARG: real[TICKET_ARG]},
    ]
    base = _reference(tiny_llama, None, prompts[:2])
    assert base != _reference(tiny_llama, adapters["iapt-1"], prompts[:2])
    for extra in forged:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra)
        assert _texts(engine.generate(prompts[:2], params, use_tqdm=False)) == base, extra


def _state_computations(engine) -> int:
    return _stats(engine)["state_computations"]


def test_state_is_computed_once_per_request_at_prefill(engine, adapters, prompts, tiny_llama):
    num_layers = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
        extra_args=adapter_args("para-2", str(adapters["para-2"])),
    )
    before = _state_computations(engine)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outputs)  # decode steps ran
    assert _state_computations(engine) - before == len(prompts) * num_layers


def test_identical_prompts_of_two_tenants_stay_apart_under_prefix_caching(engine, adapters, prompts, tiny_llama):
    """One long prompt for two adapters, then for the base model, then all again: each
    answer stays its own reference's, whatever the others left in the prefix cache."""
    prompt = prompts[-2]
    jobs = [("iapt-0", adapters["iapt-0"]), ("milora-4", adapters["milora-4"]), (None, None)]
    expected = [_reference(tiny_llama, path, [prompt])[0] for _, path in jobs]
    for _ in range(2):
        got = [_texts(engine.generate([prompt], _params(name, path), use_tqdm=False))[0] for name, path in jobs]
        assert got == expected
    assert len(set(expected)) == 3  # every tenant answers differently, so a leak would show


def test_preempted_requests_rebuild_their_state(bounded, tiny_llama, adapters, prompts):
    """Long requests of 2 adapters (a third waits) fill the 12-block cache: growing ones
    get preempted, recomputed from scratch, and must still match the reference token for
    token."""
    from vllm import SamplingParams

    long_prompts = prompts[-3:]
    jobs = [("para-3", adapters["para-3"]), ("iapt-1", adapters["iapt-1"]), ("milora-5", adapters["milora-5"])]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, extra_args=adapter_args(n, str(p)))
        for n, p in jobs
        for _ in long_prompts
    ]
    before = _state_computations(bounded)
    outputs = bounded.generate([p for _ in jobs for p in long_prompts], params, use_tqdm=False)
    computed = _state_computations(bounded) - before
    num_layers = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    assert computed > len(outputs) * num_layers  # some requests were recomputed after preemption
    expected = []
    for _, path in jobs:
        base, tokenizer = load_base(tiny_llama)
        lm = load_adapter(path, base)[0]
        ids = [encode_prompt(tokenizer, p) for p in long_prompts]
        expected += greedy_generate(lm, ids, 40, eos_id=-1, pad_id=tokenizer.pad_token_id)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_a_plugin_engine_never_loads_a_plain_engines_compiled_graph(tiny_llama, adapters, prompts, start_engine):
    """vLLM caches compiled forwards on disk under a key that leaves --worker-cls out: a
    plugin engine started after a plain engine of the same model and settings must still
    compile (and run) its own layers, not load the plain graph and answer as the base
    model. The plain engine answers as the base model does in transformers."""
    from vllm import SamplingParams

    from vllm_plugins.serving.offline import running_engine

    settings = dict(max_model_len=320, max_num_batched_tokens=CHUNK, enable_chunked_prefill=True)
    plain_prompts = prompts + INSTRUCTED_PROMPTS
    with running_engine(tiny_llama, **settings) as plain:
        base = _texts(plain.generate(plain_prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False))
    assert base == _reference(tiny_llama, None, plain_prompts) and any(base)
    plugin = start_engine(tiny_llama, **_plugin_settings(**settings))
    got = _texts(plugin.generate(prompts, _params("para-2", adapters["para-2"]), use_tqdm=False))
    expected = _reference(tiny_llama, adapters["para-2"], prompts)
    assert got == expected and got != base[:len(prompts)]
