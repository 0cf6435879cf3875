"""KV eviction inside a real vLLM engine, checked against the transformers reference.

The engine runs 32-token blocks, a 64-token scheduler chunk (prompts span several
chunks, and so may the policies' query windows) and prefix caching on, in vLLM's default
(compiled) mode and in eager mode. The model has
random weights: its greedy tokens change with any change to what it attends to, so a
wrong kept set, a wrong position or a stale block shows up in the tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.eviction.budget import min_budget, plan_eviction
from vllm_plugins.eviction.policies import POLICIES
from vllm_plugins.eviction.reference import generate_with_eviction
from vllm_plugins.tasks.retrieval import make_retrieval_example
from vllm_plugins.training.recipes import load_base

pytestmark = pytest.mark.engine

BLOCK = 32
CHUNK = 64
MAX_TOKENS = 8
NUM_PROMPTS = 20
MODES = {"compiled": {}, "eager": {"enforce_eager": True}}
NO_EOS = None  # the engine runs with ignore_eos (see params), so the reference must not stop at <eos> either


@pytest.fixture(scope="module")
def random_llama(tiny_llama, tmp_path_factory):
    """The tiny model's architecture and tokenizer with random weights (seeded)."""
    config = AutoConfig.from_pretrained(tiny_llama)
    config.initializer_range = 0.05
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [make_retrieval_example(rng, length=rng.randint(120, 320)).prompt for _ in range(NUM_PROMPTS)]


def eviction_settings(**overrides) -> dict:
    from vllm_plugins.serving.launcher import CPU_WORKER, SCHEDULER

    settings = dict(
        max_model_len=1024, worker_cls=CPU_WORKER, scheduler_cls=SCHEDULER, block_size=BLOCK,
        max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=True,
    )
    return {**settings, **overrides}


@pytest.fixture(scope="module", params=list(MODES))
def engine(request, random_llama):
    from vllm_plugins.serving.offline import running_engine

    with running_engine(random_llama, in_process=True, **eviction_settings(**MODES[request.param])) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(random_llama):
    base, tokenizer = load_base(random_llama)
    return PlainLM(base).eval(), tokenizer


def params(xargs: dict | None, seed: int | None = None, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, seed=seed, extra_args=xargs)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def kept_of(engine, outputs) -> list[list[list[list[int]]]]:
    """Each output's kept tokens, as the worker recorded them."""
    records = dict(engine.collective_rpc("kv_eviction_kept")[0])
    by_prefix = {req_id.split("-")[0]: kept for req_id, kept in records.items()}
    return [by_prefix[o.request_id] for o in outputs]


def stats(engine) -> dict[str, int]:
    return engine.collective_rpc("kv_eviction_stats")[0]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_keeps_the_reference_tokens_and_gives_its_greedy_tokens(engine, reference, prompts, policy):
    lm, tokenizer = reference
    seeds = list(range(len(prompts)))
    before = stats(engine)["evictions"]
    outputs = engine.generate(prompts, [params({"kv_eviction": policy, "kv_keep_ratio": 0.2}, s) for s in seeds], use_tqdm=False)
    assert stats(engine)["evictions"] - before == len(prompts)
    full = tokens(engine.generate(prompts, params(None), use_tqdm=False))
    for prompt, seed, got, got_kept, unevicted in zip(prompts, seeds, tokens(outputs), kept_of(engine, outputs), full):
        ids = tokenizer(prompt).input_ids
        plan = plan_eviction(policy, len(ids), -(-len(ids) // 5), BLOCK, seed)
        expected = generate_with_eviction(lm, ids, plan, MAX_TOKENS, NO_EOS)
        assert [k.tolist() for k in expected.kept] == got_kept
        assert got == expected.tokens
        budget = max(-(-len(ids) // 5), min_budget(policy, len(ids)))  # a policy keeps its protected tokens
        assert len(got_kept[0][0]) == plan.num_kept < budget + BLOCK
    changed = sum(t != f for t, f in zip(tokens(outputs), full))
    assert changed >= len(prompts) // 2  # eviction matters to this model, so the checks above bite


def test_keep_ratio_one_gives_the_tokens_of_no_eviction(engine, prompts):
    before = stats(engine)["evictions"]
    plain = tokens(engine.generate(prompts, params(None), use_tqdm=False))
    whole = tokens(engine.generate(prompts, params({"kv_eviction": "nacl", "kv_keep_ratio": 1.0}), use_tqdm=False))
    assert whole == plain
    assert stats(engine)["evictions"] == before  # nothing to free, nothing evicted


def test_a_request_that_ends_with_its_first_token_is_never_evicted(engine, prompts):
    """Eviction runs at the head of the step after the one that completes the prompt: a
    request that finished with its first token is gone by then, and is dropped, not
    evicted (its blocks may already serve another request); the next requests are served
    as usual."""
    before = stats(engine)["evictions"]
    full = tokens(engine.generate(prompts[:4], params(None), use_tqdm=False))
    xargs = {"kv_eviction": "snapkv", "kv_keep_ratio": 0.2}
    assert tokens(engine.generate(prompts[:4], params(xargs, max_tokens=1), use_tqdm=False)) == [t[:1] for t in full]
    assert tokens(engine.generate(prompts[:4], params(None), use_tqdm=False)) == full  # steps after theirs ran
    assert stats(engine)["evictions"] == before


def test_bad_settings_that_reach_the_engine_leave_the_cache_whole_and_the_engine_serving(engine, prompts):
    """The offline API has no front end to answer 400: a bad setting (an unknown policy, a
    budget above the prompt) must not stop the engine, only leave that request unevicted."""
    before = stats(engine)["evictions"]
    plain = tokens(engine.generate(prompts[:2], params(None), use_tqdm=False))
    for xargs in ({"kv_eviction": "h2o"}, {"kv_eviction": "nacl", "kv_budget": 5000}):
        assert tokens(engine.generate(prompts[:2], params(xargs), use_tqdm=False)) == plain, xargs
    assert stats(engine)["evictions"] == before
    engine.generate(prompts[:2], params({"kv_eviction": "nacl"}), use_tqdm=False)
    assert stats(engine)["evictions"] == before + 2  # still serving, and still evicting


def test_an_eviction_plan_sent_with_a_request_is_ignored(engine, prompts):
    """Plans come from the plugin's scheduler only: one forged in a request's extra_args
    (any route that passes vllm_xargs through) is dropped, whatever it says."""
    from vllm_plugins.serving.kv_eviction import PLAN_ARG

    before = stats(engine)["evictions"]
    plain = tokens(engine.generate(prompts[:2], params(None), use_tqdm=False))
    forged = {PLAN_ARG: ["snapkv", 5000, 1, 0]}  # a prompt of 5,000 tokens keeping one
    assert tokens(engine.generate(prompts[:2], params(forged), use_tqdm=False)) == plain
    assert stats(engine)["evictions"] == before


@pytest.fixture(scope="module")
def budget_and_lora(random_llama):
    """An engine with a server budget (``--kv-budget 160``, StreamingLLM) and stock LoRA on."""
    from vllm_plugins.serving.offline import running_engine

    settings = eviction_settings(enable_lora=True, max_lora_rank=8, max_loras=1,
                                 additional_config={"kv_eviction": {"policy": "streaming_llm", "budget": 160}})
    with running_engine(random_llama, in_process=True, **settings) as llm:
        yield llm


def test_a_server_budget_evicts_long_prompts_and_keeps_shorter_ones_whole(budget_and_lora, random_llama, prompts):
    """``--kv-budget 160``: prompts longer than 160 tokens plus a block are evicted, the
    others (shorter than the budget, too) run unevicted."""
    tokenizer = load_base(random_llama)[1]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    before = stats(budget_and_lora)["evictions"]
    budget_and_lora.generate(prompts, params(None), use_tqdm=False)
    evicted = stats(budget_and_lora)["evictions"] - before
    assert evicted == sum(n - 160 >= BLOCK for n in lengths)
    assert 0 < evicted < len(prompts) and min(lengths) < 160


@pytest.fixture(scope="module")
def random_adapters(random_llama, tmp_path_factory):
    from serving_fixtures import save_random_adapter

    root = tmp_path_factory.mktemp("eviction-adapters")
    return {method: save_random_adapter(method, random_llama, root / method, seed) for seed, method in enumerate(["iapt", "para", "milora", "lora"])}


def test_eviction_with_prompt_aware_adapters_and_stock_lora_in_one_batch(budget_and_lora, random_llama, random_adapters,
                                                                          prompts):
    """IAPT (its soft keys/values are not prompt tokens and stay), PARA, MiLoRA, stock LoRA
    and the base model, all evicted by NACL in one batch (their own setting, not the
    server's budget), each matching its reference."""
    from vllm.lora.request import LoRARequest

    from vllm_plugins.adapters.storage import load_adapter
    from vllm_plugins.serving.tickets import adapter_args

    engine = budget_and_lora
    eviction = {"kv_eviction": "nacl", "kv_keep_ratio": 0.2}
    kinds = ["iapt", "para", "milora", "lora", None]
    jobs = [(kind, prompt) for prompt in prompts[:4] for kind in kinds]
    requests = []
    for kind, _ in jobs:
        adapter = adapter_args(kind, str(random_adapters[kind])) if kind in ("iapt", "para", "milora") else {}
        requests.append(params({**eviction, **adapter}))
    lora = LoRARequest("lora", 1, str(random_adapters["lora"]))
    before = stats(engine)["evictions"]
    outputs = engine.generate([p for _, p in jobs], requests, lora_request=[lora if k == "lora" else None for k, _ in jobs], use_tqdm=False)
    assert stats(engine)["evictions"] - before == len(jobs)
    tokenizer = load_base(random_llama)[1]
    models = {kind: load_adapter(random_adapters[kind], load_base(random_llama)[0])[0].eval() for kind in kinds if kind}
    models[None] = PlainLM(load_base(random_llama)[0]).eval()
    for (kind, prompt), got in zip(jobs, tokens(outputs)):
        ids = tokenizer(prompt).input_ids
        plan = plan_eviction("nacl", len(ids), -(-len(ids) // 5), BLOCK, 0)
        assert got == generate_with_eviction(models[kind], ids, plan, MAX_TOKENS, NO_EOS).tokens, kind


@pytest.mark.parametrize("mode", list(MODES))
def test_preempted_evicted_requests_resume_exactly(random_llama, reference, prompts, mode, start_engine):
    """A 20-block cache holds at most two of the six longest prompts whole (8 to 11 blocks
    each): requests that grow 120 tokens past their evicted prompts get preempted after
    their eviction, recomputed from scratch (evicted again, their generated tokens
    recomputed over the kept cache) and still give the reference's tokens."""
    lm, tokenizer = reference
    small = start_engine(random_llama, **eviction_settings(num_gpu_blocks_override=20, max_model_len=512, **MODES[mode]))
    long_prompts = sorted(prompts, key=len)[-6:]
    xargs = {"kv_eviction": "snapkv", "kv_keep_ratio": 0.2}
    outputs = small.generate(long_prompts, params(xargs, max_tokens=120), use_tqdm=False)
    assert stats(small)["evictions"] > len(long_prompts)  # some were evicted twice: preempted after eviction
    for prompt, got in zip(long_prompts, tokens(outputs)):
        ids = tokenizer(prompt).input_ids
        plan = plan_eviction("snapkv", len(ids), -(-len(ids) // 5), BLOCK, 0)
        assert got == generate_with_eviction(lm, ids, plan, 120, NO_EOS).tokens


@pytest.mark.parametrize("mode", list(MODES))
def test_blocks_an_eviction_frees_serve_the_next_request_at_once(random_llama, reference, prompts, mode, start_engine):
    """The scheduler frees an evicted prompt's leading blocks when the step that completed
    it has run; the worker compacts at the head of the next step. With a cache of one long
    prompt's blocks, nothing else free, a short request waiting gets the freed blocks in
    that very next step and writes them in its forward pass: the compaction must have read
    them first. Every request still gives the reference's tokens."""
    lm, tokenizer = reference
    by_length = sorted(prompts, key=len)
    jobs = [by_length[-1], *by_length[:3]]  # the longest first, then three short ones
    blocks = -(-len(tokenizer(jobs[0]).input_ids) // BLOCK) + 1  # the longest prompt and vLLM's null block
    small = start_engine(random_llama, **eviction_settings(num_gpu_blocks_override=blocks, max_model_len=(blocks - 1) * BLOCK,
                                                           **MODES[mode]))
    engine = small.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    xargs = {"kv_eviction": "snapkv", "kv_keep_ratio": 0.2}
    for i, prompt in enumerate(jobs):
        engine.add_request(str(i), prompt, params(xargs))
    first, second = (next(r for r in scheduler.requests if r.split("-")[0] == name) for name in ("0", "1"))
    finished = {}
    while scheduler.requests[first].num_computed_tokens < scheduler.requests[first].num_prompt_tokens:
        held = set(scheduler.kv_cache_manager.get_block_ids(first)[0])
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    freed = held - set(scheduler.kv_cache_manager.get_block_ids(first)[0])
    finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert freed and freed & set(scheduler.kv_cache_manager.get_block_ids(second)[0])  # the blocks went on at once
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert stats(small)["evictions"] >= len(jobs)
    for i, prompt in enumerate(jobs):
        ids = tokenizer(prompt).input_ids
        plan = plan_eviction("snapkv", len(ids), -(-len(ids) // 5), BLOCK, 0)
        got = next(o for name, o in finished.items() if name.split("-")[0] == str(i)).outputs[0].token_ids
        assert list(got) == generate_with_eviction(lm, ids, plan, MAX_TOKENS, NO_EOS).tokens
