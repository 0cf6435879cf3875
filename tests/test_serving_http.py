"""A real ``vllm-plugins serve`` (vLLM's OpenAI server) on loopback, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from serving_fixtures import save_random_adapter
from vllm_plugins.adapters.storage import load_adapter
from vllm_plugins.tasks import load_task
from vllm_plugins.training.evaluate import generate_answers
from vllm_plugins.training.recipes import load_base

STARTUP_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    save_random_adapter("para", tiny_llama, root / "acme-para", seed=1)
    save_random_adapter("iapt", tiny_llama, root / "globex-iapt", seed=2)
    save_random_adapter("milora", tiny_llama, root / "initech-milora", seed=3)
    save_random_adapter("lora", tiny_llama, root / "umbrella-lora", seed=4)
    # candidates for run-time loading: a good one, another base model's, a corrupt one
    spare = tmp_path_factory.mktemp("spare")
    save_random_adapter("para", tiny_llama, spare / "late-para", seed=5)
    save_random_adapter("para", tiny_qwen2, spare / "qwen-para", seed=6)
    save_random_adapter("para", tiny_llama, spare / "corrupt-para", seed=7)
    weights = spare / "corrupt-para" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    return root, spare


@pytest.fixture(scope="module")
def server(tiny_llama, adapter_dir, tmp_path_factory):
    root, _ = adapter_dir
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm_plugins.cli", "serve", str(tiny_llama), "--adapter-dir", str(root),
        "--runtime-loading", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "demo",
        "--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--max-num-batched-tokens", "64",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail(f"server did not start in {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)


def _complete(url, model, prompt, **extra):
    return _request(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra})


def test_models_lists_adapters_with_their_method(server):
    status, body = _request(f"{server}/v1/models")
    assert status == 200
    ids = {m["id"]: m for m in body["data"]}
    assert {"demo", "acme-para", "globex-iapt", "initech-milora", "umbrella-lora"} <= set(ids)
    assert ids["acme-para"]["method"] == "para" and ids["globex-iapt"]["method"] == "iapt"


@pytest.mark.parametrize("name", ["acme-para", "globex-iapt", "initech-milora"])
def test_completions_match_the_reference(server, adapter_dir, tiny_llama, name):
    prompts = [e.prompt for e in load_task("shift").test[:5]]
    base, tokenizer = load_base(tiny_llama)
    lm, _ = load_adapter(adapter_dir[0] / name, base)
    expected = generate_answers(lm, tokenizer, prompts, max_new_tokens=8)
    got = []
    for p in prompts:
        status, body = _complete(server, name, p)
        assert status == 200, body
        got.append(body["choices"][0]["text"].strip())
    assert got == expected


def test_chat_completions_and_streaming(server, adapter_dir, tiny_llama):
    prompt = load_task("shift").test[0].prompt
    _, plain = _complete(server, "acme-para", prompt)
    status, chat = _request(
        f"{server}/v1/chat/completions",
        {"model": "acme-para", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0},
    )
    assert status == 200, chat
    assert chat["choices"][0]["message"]["content"].strip() == plain["choices"][0]["text"].strip()
    req = urllib.request.Request(
        f"{server}/v1/completions",
        data=json.dumps({"model": "acme-para", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}).encode(),
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
    status, body = _request(f"{server}/v1/completions", b'{"model": "acme-para", "prompt": ')
    assert status == 400 and "error" in body
    status, body = _complete(server, "acme-para", "a b =", temperature=-1)
    assert status == 400 and body["error"]["code"] == 400
    status, body = _complete(server, "acme-para", "a b =", vllm_xargs={"prompt_adapter_path": "/etc"})
    assert status == 400 and "reserved" in body["error"]["message"]


def test_runtime_loading_validates_and_keeps_serving(server, adapter_dir):
    _, spare = adapter_dir
    root, _ = adapter_dir
    load = f"{server}/v1/load_prompt_adapter"
    status, body = _request(load, {"adapter_name": "qwen", "adapter_path": str(spare / "qwen-para")})
    assert status == 400  # outside the adapter directory
    for name in ("late-para", "qwen-para", "corrupt-para"):
        shutil.copytree(spare / name, root / name)
    status, body = _request(load, {"adapter_name": "qwen", "adapter_path": str(root / "qwen-para")})
    assert status == 400 and "another base model" in body["error"]["message"]
    status, body = _request(load, {"adapter_name": "corrupt", "adapter_path": str(root / "corrupt-para")})
    assert status == 400 and "corrupt weights" in body["error"]["message"]
    status, body = _request(load, {"adapter_name": "late", "adapter_path": str(root / "late-para")})
    assert status == 200, body
    assert _complete(server, "late", "a b c =")[0] == 200
    assert _complete(server, "acme-para", "a b c =")[0] == 200  # everyone else is still served
    status, _ = _request(f"{server}/v1/unload_prompt_adapter", {"adapter_name": "late"})
    assert status == 200
    assert _complete(server, "late", "a b c =")[0] == 404
