"""The OpenAI API of a real ``vllm-plugins serve`` on loopback: listing, chat, streaming,
errors and run-time loading (the ``server`` fixture in conftest.py)."""

from __future__ import annotations

import json
import random
import shutil
import urllib.request

import pytest

from vllm_plugins.serving.process import request_json as _request
from serving_fixtures import save_random_adapter
from vllm_plugins.tasks import load_task
from vllm_plugins.tasks.retrieval import make_retrieval_example

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def spare_adapters(tiny_llama, tiny_qwen2, tmp_path_factory):
    """Candidates for run-time loading: a good one, another base model's, a corrupt one."""
    spare = tmp_path_factory.mktemp("spare")
    save_random_adapter("para", tiny_llama, spare / "late-para", seed=21)
    save_random_adapter("para", tiny_qwen2, spare / "qwen-para", seed=22)
    save_random_adapter("para", tiny_llama, spare / "corrupt-para", seed=23)
    weights = spare / "corrupt-para" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    return spare


def _complete(url, model, prompt, **extra):
    return _request(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra})


def test_models_lists_adapters_with_their_method(server):
    status, body = _request(f"{server}/v1/models")
    assert status == 200
    ids = {m["id"]: m for m in body["data"]}
    assert {"demo", "para-1", "iapt-1", "milora-1", "lora-1"} <= set(ids)
    assert ids["para-1"]["method"] == "para" and ids["iapt-1"]["method"] == "iapt"


def test_chat_completions_and_streaming(server):
    prompt = load_task("shift").test[0].prompt
    _, plain = _complete(server, "para-1", prompt)
    status, chat = _request(
        f"{server}/v1/chat/completions",
        {"model": "para-1", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0},
    )
    assert status == 200, chat
    assert chat["choices"][0]["message"]["content"].strip() == plain["choices"][0]["text"].strip()
    req = urllib.request.Request(
        f"{server}/v1/completions",
        data=json.dumps({"model": "para-1", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    pieces = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces).strip() == plain["choices"][0]["text"].strip()


def test_unknown_adapter_is_404_in_openai_format(server):
    status, body = _complete(server, "no-such-tenant", "a b =")
    assert status == 404
    assert body["error"]["code"] == 404 and "no-such-tenant" in body["error"]["message"]


def test_malformed_json_and_bad_parameters_are_400(server):
    status, body = _request(f"{server}/v1/completions", b'{"model": "para-1", "prompt": ')
    assert status == 400 and "error" in body
    status, body = _complete(server, "para-1", "a b =", temperature=-1)
    assert status == 400 and body["error"]["code"] == 400
    status, body = _complete(server, "para-1", "a b =", vllm_xargs={"prompt_adapter_path": "/etc"})
    assert status == 400 and "reserved" in body["error"]["message"]
    status, body = _complete(server, "demo", "a b =", vllm_xargs={"kv_eviction_plan": ["nacl", 3, 1, 0]})
    assert status == 400 and "reserved" in body["error"]["message"]


@pytest.mark.parametrize("xargs,message", [
    ({"kv_eviction": "h2o"}, "unknown KV eviction policy"),
    ({"kv_eviction": "nacl", "kv_keep_ratio": 0}, "must be in (0, 1]"),
    ({"kv_eviction": "nacl", "kv_keep_ratio": 1.5}, "must be in (0, 1]"),
    ({"kv_eviction": "nacl", "kv_budget": 400}, "larger than the prompt"),
    ({"kv_eviction": "nacl", "kv_budget": 1}, "the smallest budget is 12"),  # 4 sinks and the last 8 tokens
    ({"kv_eviction": "snapkv", "kv_budget": 63}, "the smallest budget is 64"),  # its observation window
    ({"kv_keep_ratio": 0.5}, "need a policy"),
    ({"kv_evicton": "nacl", "kv_keep_ratio": 0.5}, "unknown KV eviction settings in vllm_xargs: 'kv_evicton'"),
    ({"kv_eviction": "snapkv", "KV-KEEP-RATIO": 0.01}, "unknown KV eviction settings in vllm_xargs: 'KV-KEEP-RATIO'"),
    ({"kv_eviction": "nacl", "kv_budget": None}, "kv_budget cannot be null"),  # not vLLM's pydantic message
])
def test_bad_kv_eviction_settings_are_400_and_the_server_keeps_serving(server, xargs, message):
    prompt = make_retrieval_example(random.Random(1), length=300).prompt  # 304 tokens
    for model in ("demo", "para-1", "lora-1"):
        status, body = _complete(server, model, prompt, vllm_xargs=xargs)
        assert status == 400 and body["error"]["code"] == 400 and message in body["error"]["message"], body
    chat = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "vllm_xargs": xargs}
    status, body = _request(f"{server}/v1/chat/completions", chat)
    assert status == 400 and message in body["error"]["message"], body
    for model in ("demo", "para-1", "lora-1"):  # evicted for real: 128-token blocks, one freed
        status, body = _complete(server, model, prompt, vllm_xargs={"kv_eviction": "nacl", "kv_budget": 60}, ignore_eos=True)
        # every token generated (a tenant's 8 tokens may all be blank: the text is not judged here)
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body


@pytest.fixture
def late_adapters(served_adapter_dir, spare_adapters):
    """The spare adapters copied into the session's shared adapter directory for one test,
    and removed after it: other modules (Ray Serve's) serve that directory too."""
    names = ("late-para", "qwen-para", "corrupt-para")
    for name in names:
        shutil.copytree(spare_adapters / name, served_adapter_dir / name)
    yield served_adapter_dir
    for name in names:
        shutil.rmtree(served_adapter_dir / name)


def test_runtime_loading_validates_and_keeps_serving(server, spare_adapters, late_adapters):
    root, spare = late_adapters, spare_adapters
    load = f"{server}/v1/load_prompt_adapter"
    status, body = _request(load, {"adapter_name": "qwen", "adapter_path": str(spare / "qwen-para")})
    assert status == 400  # outside the adapter directory
    status, body = _request(load, {"adapter_name": "qwen", "adapter_path": str(root / "qwen-para")})
    assert status == 400 and "another base model" in body["error"]["message"]
    status, body = _request(load, {"adapter_name": "corrupt", "adapter_path": str(root / "corrupt-para")})
    assert status == 400 and "corrupt weights" in body["error"]["message"]
    status, body = _request(load, {"adapter_name": "late", "adapter_path": str(root / "late-para")})
    assert status == 200, body
    assert _complete(server, "late", "a b c =")[0] == 200
    assert _complete(server, "para-1", "a b c =")[0] == 200  # everyone else is still served
    status, _ = _request(f"{server}/v1/unload_prompt_adapter", {"adapter_name": "late"})
    assert status == 200
    assert _complete(server, "late", "a b c =")[0] == 404
