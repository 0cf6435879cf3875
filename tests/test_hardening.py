"""Untrusted input against a real ``vllm-plugins serve`` on loopback: what clients send on
any route, and every file of an adapter directory.

One server for the module, with ``--api-key``, run-time loading, ``--max-active 1``, a
stock LoRA tenant and three prompt-aware ones, and three adapters it cannot serve present
at start. After every input that once reached the engine, :func:`assert_everyone_served`
checks ``/health`` and every tenant's greedy answers against the transformers reference.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import SERVER_ARGS
from helpers import build
from serving_fixtures import reference_answers, reference_prompt_logprobs, scale_weights
from vllm_plugins.adapters.iapt import IaptConfig
from vllm_plugins.adapters.storage import MANIFEST, describe_base, save_adapter
from vllm_plugins.serving.process import ServerProcess
from vllm_plugins.tasks import load_task
from vllm_plugins.tasks.retrieval import make_retrieval_example
from vllm_plugins.training.recipes import load_base

pytestmark = pytest.mark.engine

KEY = "test-key"
BASE = "demo"
MAX_TOKENS = 8
TENANTS = {"iapt-1": "iapt", "para-1": "para", "milora-1": "milora", "milora-2": "milora", "lora-1": "lora"}
AUTH = {"Authorization": f"Bearer {KEY}"}


def _set_manifest(adapter: Path, field: str, value) -> None:
    manifest = json.loads((adapter / MANIFEST).read_text())
    manifest[field] = value
    (adapter / MANIFEST).write_text(json.dumps(manifest))


def _set_weights_file(adapter: Path, file: str) -> None:
    manifest = json.loads((adapter / MANIFEST).read_text())
    _set_manifest(adapter, "weights", {**manifest["weights"], "file": file})


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, served_adapter_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening-adapters")
    for name in TENANTS:
        shutil.copytree(served_adapter_dir / name, root / name)
    lm, base, _ = build("iapt", tiny_llama, num_soft_tokens=200)  # more soft tokens than a KV block
    save_adapter(root / "wide-iapt", "iapt", IaptConfig(num_soft_tokens=200), lm, describe_base(base, tiny_llama))
    shutil.copytree(served_adapter_dir / "para-2", root / "bad-weights")
    (root / "bad-weights" / "adapter.safetensors").write_bytes(b"not safetensors")
    shutil.copytree(served_adapter_dir / "para-3", root / "escape")
    _set_weights_file(root / "escape", "../para-1/adapter.safetensors")
    for name in ("iapt-2", "para-2", "milora-1"):  # served, but their activations overflow to inf / NaN
        scale_weights(shutil.copytree(served_adapter_dir / name, root / f"huge-{name}"), 1e18)
    for name, field, value in (("bad-base", "base_model", "x"), ("bad-method", "method", ["para"])):
        shutil.copytree(served_adapter_dir / "para-2", root / name)
        _set_manifest(root / name, field, value)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama, adapter_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    server = ServerProcess.start(tiny_llama, adapter_dir, log, *SERVER_ARGS, "--api-key", KEY, "--max-active", "1")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [e.prompt for e in load_task("reverse").test[:2]]


@pytest.fixture(scope="module")
def expected(tiny_llama, served_adapter_dir, prompts) -> dict[str, list[str]]:
    references = {BASE: reference_answers(tiny_llama, None, prompts, MAX_TOKENS)}
    for name in TENANTS:
        references[name] = reference_answers(tiny_llama, served_adapter_dir / name, prompts, MAX_TOKENS)
    return references


def _complete(client: httpx.Client, model: str, prompt, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"].strip()


def assert_everyone_served(server, client, prompts, expected) -> None:
    assert server.alive() and client.get("/health").status_code == 200
    for model in expected:
        assert [_text(_complete(client, model, p)) for p in prompts] == expected[model], model


def _error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and message in error["message"], error


# -- 1. one request or one adapter never takes the engine down ---------------------------
def test_prompt_logprobs_beside_lora_tenants_equal_the_reference(server, client, tiny_llama, served_adapter_dir,
                                                                  prompts, expected):
    """vLLM 0.32's CPU LoRA logits path gave the step's per-request LoRA indices to one
    request's prompt rows, which stopped the engine once two requests shared a step. Now
    the base model's and a LoRA tenant's prompt log-probabilities, requested together with
    other tenants' requests and over several prefill chunks, equal the reference's."""
    tokenizer = load_base(tiny_llama)[1]
    token_ids = tokenizer(make_retrieval_example(random.Random(3), length=150).prompt)["input_ids"]
    wanted = {BASE: None, "lora-1": served_adapter_dir / "lora-1"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as c:
            body = {"prompt": token_ids, "max_tokens": 4, "temperature": 0}
            asks = [c.post("/v1/completions", json={**body, "model": m, "prompt_logprobs": 1}) for m in wanted]
            others = [c.post("/v1/completions", json={**body, "model": m, "prompt": p})
                      for m in ("para-1", "lora-1", BASE) for p in prompts]
            return (await asyncio.gather(*asks, *others))[: len(wanted)]

    for (model, adapter), response in zip(wanted.items(), asyncio.run(burst())):
        assert response.status_code == 200, response.text
        served = response.json()["choices"][0]["prompt_logprobs"]
        assert served[0] is None and len(served) == len(token_ids)
        got = [entry[str(t)]["logprob"] for entry, t in zip(served[1:], token_ids[1:])]
        want = reference_prompt_logprobs(tiny_llama, adapter, token_ids)
        assert max(abs(g - w) for g, w in zip(got, want)) < 1e-3, model
    chat = {"model": BASE, "messages": [{"role": "user", "content": "a b ="}], "max_tokens": 1, "prompt_logprobs": 1}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert_everyone_served(server, client, prompts, expected)


def test_adapter_files_changed_after_registration_are_not_read(server, client, adapter_dir, prompts, expected):
    """What was validated is what is served: the files are moved or appended to after the
    adapter is registered, before its first request."""
    weights = adapter_dir / "milora-2" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    moved = adapter_dir.parent / "moved-para-1"
    shutil.move(adapter_dir / "para-1", moved)
    try:
        assert [_text(_complete(client, "milora-2", p)) for p in prompts] == expected["milora-2"]
        assert [_text(_complete(client, "para-1", p)) for p in prompts] == expected["para-1"]
    finally:
        shutil.move(moved, adapter_dir / "para-1")
    assert_everyone_served(server, client, prompts, expected)


def test_adapters_the_server_cannot_hold_are_left_out_at_start(server, client, prompts, expected):
    listing = client.get("/v1/models").json()
    refused = {r["id"]: r["error"] for r in listing["prompt_adapters_refused"]}
    assert "max_soft_tokens 4" in refused["wide-iapt"]
    assert "corrupt weights" in refused["bad-weights"]
    assert "not a file inside the adapter directory" in refused["escape"]
    assert "another base model" in refused["bad-base"] and "unknown method" in refused["bad-method"]
    ids = [m["id"] for m in listing["data"]]
    assert not {"wide-iapt", "bad-weights", "escape", "bad-base", "bad-method"} & set(ids)
    assert ids.count(BASE) == 1 and set(TENANTS) <= set(ids)
    _error(_complete(client, "wide-iapt", prompts[0]), 404, "wide-iapt")
    assert_everyone_served(server, client, prompts, expected)


def test_a_tenant_whose_activations_overflow_leaves_nothing_for_the_others(server, client, prompts, expected):
    """Adapters with finite but huge weights drive their requests to inf / NaN. IAPT's soft
    keys/values then stayed NaN in the KV block they gave back, and base-model requests of
    the next round answered ''. Two rounds of the base model and three such tenants at once:
    the base model's answers stay right."""
    base_prompts = prompts * 4

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as c:
            body = {"max_tokens": MAX_TOKENS, "temperature": 0}
            asks = [c.post("/v1/completions", json={**body, "model": m, "prompt": p})
                    for p in base_prompts for m in (BASE, "huge-iapt-2", "huge-para-2", "huge-milora-1")]
            return (await asyncio.gather(*asks))[::4]

    for _ in range(2):
        assert [_text(r) for r in asyncio.run(burst())] == expected[BASE] * 4
    assert_everyone_served(server, client, prompts, expected)


def test_seeded_sampling_of_a_prompt_longer_than_a_step(server, client, prompts, expected):
    """vLLM rewinds a seeded request's generator after sampling for an incomplete prompt,
    which CPU generators cannot do: the engine died. The stream must also continue as if
    the discarded draws had not happened: the same request twice gives the same text."""
    prompt = make_retrieval_example(random.Random(2), length=150).prompt  # 3 scheduler steps of prefill
    texts = set()
    for _ in range(2):
        response = _complete(client, BASE, prompt, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
        texts.add(_text(response))
    assert len(texts) == 1
    assert_everyone_served(server, client, prompts, expected)


def test_runtime_loads_of_malformed_adapters_are_400(client, adapter_dir, served_adapter_dir):
    deep = adapter_dir / "deep"
    shutil.copytree(served_adapter_dir / "para-2", deep)
    (deep / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    for path in (str(deep), str(adapter_dir / "bad-base"), str(adapter_dir / "bad-method"), "\u0000", str(adapter_dir) + "\0x"):
        response = client.post("/v1/load_prompt_adapter", json={"adapter_name": "malformed", "adapter_path": path})
        assert response.status_code == 400, (path, response.text)
    shutil.rmtree(deep)


# -- 2. internal per-request state never comes from a request ----------------------------
@pytest.mark.parametrize("route, body", [
    ("/v1/messages", {"model": BASE, "max_tokens": 4, "messages": [{"role": "user", "content": "a b ="}]}),
    ("/v1/responses", {"model": BASE, "input": "a b =", "max_output_tokens": 4}),
    ("/invocations", {"model": BASE, "prompt": "a b =", "max_tokens": 4}),
    ("/v1/chat/completions", {"model": BASE, "max_tokens": 4, "messages": [{"role": "user", "content": "a b ="}]}),
])
@pytest.mark.parametrize("xargs", [
    {"prompt_adapter": "para-1", "prompt_adapter_path": "/etc"},
    {"prompt_adapter_ticket": "0" * 64},
    {"prompt_adapter_soft_kv_slot": [1, 0, 4]},
    {"kv_eviction_plan": ["nacl", 3, 1, 0]},
])
def test_reserved_vllm_xargs_are_refused_on_every_route(server, client, route, body, xargs):
    _error(client.post(route, json={**body, "vllm_xargs": xargs}), 400, "reserved")
    assert client.get("/health").status_code == 200


def test_kv_eviction_settings_are_refused_off_the_generation_routes(server, client):
    xargs = {"kv_eviction": "snapkv", "kv_keep_ratio": 0.2}
    _error(client.post("/tokenize", json={"model": BASE, "prompt": "a b =", "vllm_xargs": xargs}), 400, "taken on")
    # with a trailing slash vLLM redirects to the route itself, which checks them
    reply = client.post("/v1/completions/", json={"model": BASE, "prompt": "a b =", "max_tokens": 2, "vllm_xargs": xargs})
    assert reply.status_code in (307, 308) and reply.headers["location"].endswith("/v1/completions"), reply.text


# -- 3. tenant identity ------------------------------------------------------------------
@pytest.mark.parametrize("name, message", [
    (BASE, "served model"), ("lora-1", "LoRA adapter"), ("para-1", "already loaded"),
    ("bad\nname", "letters, digits"), ("x" * 1000, "letters, digits"), ("", "letters, digits"),
])
def test_load_refuses_names_that_collide_or_are_malformed(client, adapter_dir, name, message):
    response = client.post("/v1/load_prompt_adapter", json={"adapter_name": name, "adapter_path": str(adapter_dir / "para-1")})
    _error(response, 400, message)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]].count(BASE) == 1


def test_responses_name_the_tenant(server, client, prompts):
    assert _complete(client, "para-1", prompts[0]).json()["model"] == "para-1"
    chat = client.post("/v1/chat/completions", json={
        "model": "iapt-1", "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["model"] == "iapt-1", chat.text
    for route, body in (("/v1/completions", {"prompt": prompts[0]}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[0]}]})):
        body = {**body, "model": "milora-1", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", route, json=body) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert len(events) >= 3 and {e["model"] for e in events} == {"milora-1"}, events


def test_a_client_cache_salt_never_reads_a_tenants_blocks(client, tiny_llama):
    """The base model asked with the salt the front end once gave a tenant, on the tokens
    that tenant generated: its log-probs are the base model's own."""
    prompt = make_retrieval_example(random.Random(5), length=90).prompt
    ids = client.post("/tokenize", json={"model": BASE, "prompt": prompt}).json()["tokens"]
    tenant = _complete(client, "iapt-1", ids, max_tokens=60, ignore_eos=True, logprobs=0, return_tokens_as_token_ids=True)
    assert tenant.status_code == 200, tenant.text
    generated = [int(t.removeprefix("token_id:")) for t in tenant.json()["choices"][0]["logprobs"]["tokens"]]
    tokens = (ids + generated)[:140]  # a full 128-token block holding the tenant's adapted tokens

    def base_logprobs(**salt) -> list[float]:
        response = _complete(client, BASE, tokens, max_tokens=4, logprobs=0, **salt)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]["token_logprobs"]

    plain = base_logprobs()
    for salt in ("prompt-adapter:iapt-1", "iapt-1", ""):
        spoofed = base_logprobs(cache_salt=salt) if salt else base_logprobs()
        assert spoofed == pytest.approx(plain, abs=1e-4), salt


def test_an_adapter_reloaded_from_a_changed_directory_is_the_new_one(server, client, adapter_dir, served_adapter_dir,
                                                                     tiny_llama, prompts, expected):
    slot = adapter_dir / "swap"
    shutil.copytree(served_adapter_dir / "para-2", slot)
    load = {"adapter_name": "swap", "adapter_path": str(slot)}
    assert client.post("/v1/load_prompt_adapter", json=load).status_code == 200
    assert [_text(_complete(client, "swap", p)) for p in prompts] == reference_answers(
        tiny_llama, served_adapter_dir / "para-2", prompts, MAX_TOKENS)
    assert client.post("/v1/unload_prompt_adapter", json={"adapter_name": "swap"}).status_code == 200
    shutil.rmtree(slot)
    shutil.copytree(served_adapter_dir / "milora-1", slot)  # another method, same name and path
    assert client.post("/v1/load_prompt_adapter", json=load).status_code == 200
    assert [_text(_complete(client, "swap", p)) for p in prompts] == expected["milora-1"]
    assert client.post("/v1/unload_prompt_adapter", json={"adapter_name": "swap"}).status_code == 200
    assert_everyone_served(server, client, prompts, expected)


# -- 4. run-time loading (and every other write) is authenticated and contained ---------
@pytest.mark.parametrize("method, route, body", [
    ("POST", "/v1/load_prompt_adapter", {"adapter_name": "x", "adapter_path": "/tmp"}),
    ("POST", "/v1/unload_prompt_adapter", {"adapter_name": "para-1"}),
    ("POST", "/v1/completions", {"model": "para-1", "prompt": "a b =", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/invocations", {"model": "para-1", "prompt": "a b =", "max_tokens": 2}),
    ("POST", "/tokenize", {"model": BASE, "prompt": "a b ="}),
    ("POST", "/scale_elastic_ep", {"new_data_parallel_size": 2}),  # vLLM's admin routes outside /v1
    ("POST", "/reset_prefix_cache", None),
])
def test_every_v1_route_and_every_other_write_needs_the_api_key(server, route, method, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.request(method, server.url + route, json=body, headers=headers, timeout=60)
        _error(response, 401, "API key")
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + "/ping").status_code == 200  # SageMaker's health check stays open


def test_weights_outside_the_adapter_directory_are_refused_alike(client, adapter_dir, served_adapter_dir):
    messages = []
    for target in ("../../../etc/passwd", "../../../etc/no-such-file", "../para-1/adapter.safetensors"):
        candidate = adapter_dir / "outside"
        shutil.copytree(served_adapter_dir / "para-2", candidate)
        _set_weights_file(candidate, target)
        response = client.post("/v1/load_prompt_adapter", json={"adapter_name": "outside", "adapter_path": str(candidate)})
        _error(response, 400, "is not a file inside the adapter directory")
        messages.append(response.json()["error"]["message"].replace(target, "<target>"))
        shutil.rmtree(candidate)
    assert len(set(messages)) == 1  # no oracle of what exists outside


# -- 5. heavy work stays off the event loop; bounds come first -----------------------------
def test_a_huge_body_is_refused_before_it_is_read_while_others_are_served(server, prompts, expected):
    huge = {"model": "para-1", "prompt": "a " * 5_000_000, "max_tokens": 2, "vllm_xargs": {"kv_eviction": "nacl", "kv_budget": 64}}

    async def both():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as aclient:
            big = asyncio.create_task(aclient.post("/v1/completions", json=huge))
            began = time.monotonic()
            small = await aclient.post("/v1/completions", json={
                "model": "iapt-1", "prompt": prompts[0], "max_tokens": MAX_TOKENS, "temperature": 0})
            return await big, small, time.monotonic() - began

    big, small, small_seconds = asyncio.run(both())
    _error(big, 413, "bytes")
    assert small.status_code == 200 and small.json()["choices"][0]["text"].strip() == expected["iapt-1"][0]
    assert small_seconds < 15  # a blocked event loop held it for the whole body (17 s seen)


# -- 6. validation sees what the engine will see -------------------------------------------
def test_budget_is_checked_against_the_truncated_prompt(client):
    prompt = make_retrieval_example(random.Random(1), length=300).prompt  # 304 tokens
    response = _complete(client, BASE, prompt, truncate_prompt_tokens=200, vllm_xargs={"kv_eviction": "nacl", "kv_budget": 250})
    _error(response, 400, "larger than the prompt (200 tokens)")


def test_budget_is_checked_against_the_prompt_without_special_tokens(client):
    prompt = make_retrieval_example(random.Random(1), length=300).prompt
    count = client.post("/tokenize", json={"model": BASE, "prompt": prompt}).json()["count"]
    response = _complete(client, BASE, prompt, add_special_tokens=False, vllm_xargs={"kv_eviction": "nacl", "kv_budget": count})
    _error(response, 400, f"larger than the prompt ({count - 1} tokens)")


def test_a_deeply_nested_body_is_400(client):
    response = client.post("/v1/completions", content=b"[" * 40_000 + b"]" * 40_000, headers={"Content-Type": "application/json"})
    _error(response, 400, "nested too deeply")


def test_malformed_vllm_xargs_is_400_and_the_connection_keeps_working(client, prompts, expected):
    for xargs in ("x", 3, ["prompt_adapter"]):
        _error(_complete(client, "para-1", prompts[0], vllm_xargs=xargs), 400, "vllm_xargs must be a JSON object")
    assert _text(_complete(client, "para-1", prompts[0])) == expected["para-1"][0]  # same keep-alive connection
