"""The plugins' server on Ray Serve, on a real two-node Ray cluster on this machine (a head
and a second node started with ``ray start --address``): two replicas, one per node,
answering OpenAI requests for adapters of every kind as a plain server does, and
surviving the loss of a replica under a Locust load test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SERVER_ARGS, SERVED_ADAPTERS

from vllm_plugins.loadtest.report import read_records
from vllm_plugins.serving.process import free_port, request_json

BASE = "demo"
RAY = str(Path(sys.executable).parent / "ray")
PROMPTS = ("c a b = reverse", "x y z w = upper", "d e f g h = count")
MAX_TOKENS = 8


def _ray(*args: str) -> None:
    done = subprocess.run([RAY, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second node, with the token authentication conftest.py sets up."""
    port = free_port()
    common = ["--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        _ray("start", "--head", "--port", str(port), "--include-dashboard", "false", *common)
        _ray("start", "--address", f"127.0.0.1:{port}", *common)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)


@pytest.fixture(scope="module")
def ray_service(ray_cluster, tiny_llama, served_adapter_dir):
    import ray
    from ray import serve

    from vllm_plugins.deploy.ray_serve import RayServeConfig, build_app

    ray.init(address=ray_cluster, logging_level="WARNING")
    port = free_port()
    # One HTTP proxy: both nodes are this machine, so a proxy per node would share a port.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    config = RayServeConfig(model=str(tiny_llama), adapter_dir=str(served_adapter_dir), serve_args=list(SERVER_ARGS), num_replicas=2,
                            max_replicas_per_node=1)
    serve.run(build_app(config), name="vllm-plugins", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _where(replica) -> dict:
    import ray

    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": context.get_node_id(), "actor_id": context.get_actor_id()}


def _replicas() -> list[dict]:
    """The live PluginServer replicas: each one's process, node and actor id."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and "PluginServer" in entry["name"]:
            try:
                actor = ray.get_actor(entry["name"], namespace="serve")
                found.append(ray.get(actor.__ray_call__.remote(_where), timeout=30))
            except (ValueError, ray.exceptions.RayActorError):
                continue  # gone since it was listed
    return found


def _greedy(url: str, model: str, prompt: str) -> str:
    status, body = request_json(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"]


def test_two_nodes_and_a_replica_on_each(ray_service):
    import ray

    assert sum(node["Alive"] for node in ray.nodes()) == 2
    replicas = _replicas()
    assert len(replicas) == 2
    assert len({r["node_id"] for r in replicas}) == 2


def test_every_kind_of_adapter_answers_as_on_a_plain_server(ray_service, server):
    models = [BASE, *SERVED_ADAPTERS]  # base, IAPT, PARA, MiLoRA, stock LoRA
    for model in models:
        for prompt in PROMPTS:
            assert _greedy(ray_service, model, prompt) == _greedy(server, model, prompt), (model, prompt)
    status, listed = request_json(f"{ray_service}/v1/models")
    assert status == 200 and {m["id"] for m in listed["data"]} >= set(models)


def test_streaming_through_ray_serve(ray_service, server):
    import httpx

    body = {"model": "iapt-1", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{ray_service}/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        chunks = [line for line in reply.iter_lines() if line.startswith("data: {")]
    text = "".join(json.loads(c[len("data: "):])["choices"][0]["text"] for c in chunks)
    assert len(chunks) == MAX_TOKENS and text == _greedy(server, "iapt-1", PROMPTS[0])


def test_bad_requests_get_openai_errors_through_ray_serve(ray_service):
    status, body = request_json(f"{ray_service}/v1/completions", {"model": "nobody", "prompt": "a", "max_tokens": 2})
    assert status == 404 and "nobody" in body["error"]["message"]
    status, body = request_json(f"{ray_service}/v1/completions", b"{not json")
    assert status == 400 and body["error"]["message"]
    status, body = request_json(f"{ray_service}/v1/completions", {"prompt": "a"})
    assert status == 400 and "model" in body["error"]["message"]
    assert _greedy(ray_service, BASE, PROMPTS[0])


def _load_config(path: Path, requests: int, timeout_s: int) -> Path:
    lines = [
        "[load]", "users = 5", "spawn_rate = 5", f"max_requests = {requests}", "run_time_s = 240",
        f"request_timeout_s = {timeout_s}", "seed = 2",
        "[slo]", "ttft_ms = 60000", "tpot_ms = 60000",
        "[prompt_tokens]", 'kind = "uniform"', "low = 6", "high = 16",
        "[output_tokens]", 'kind = "uniform"', "low = 4", "high = 8",
        "[[tenant]]", 'name = "base"', 'method = "base"', f'model = "{BASE}"',
    ]
    for name in ("iapt-1", "para-1", "milora-1", "lora-1"):
        lines += ["[[tenant]]", f'name = "{name}"', f'method = "{SERVED_ADAPTERS[name][0]}"', f'model = "{name}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_same_load_through_ray_serve_and_a_plain_server(ray_service, server, tmp_path):
    """The Ray Serve overhead: the same Locust run against both, one after the other."""
    from vllm_plugins.loadtest.runner import run_loadtest

    config = _load_config(tmp_path / "loadtest.toml", requests=40, timeout_s=60)
    figures = {}
    for name, url in (("plain", server), ("ray-serve", ray_service)):
        for model in (BASE, "iapt-1", "para-1", "milora-1", "lora-1"):  # adapters loaded before timing
            _greedy(url, model, PROMPTS[0])
        run_loadtest(config, url, tmp_path / name)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["requests"] == 40 and summary["failed"] == 0, summary["failures"]
        figures[name] = {m: {k: s[k] for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")} for m, s in summary["by_method"].items()}
    print("Ray Serve overhead (same load test, plain server then Ray Serve):", json.dumps(figures, indent=1))


RECOVERY_S = 2


def test_killing_a_replica_under_load(ray_service, server, tmp_path):
    from ray import serve

    from vllm_plugins.loadtest.runner import run_loadtest

    config = _load_config(tmp_path / "loadtest.toml", requests=120, timeout_s=30)
    out = tmp_path / "run"
    victim = _replicas()[0]
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_loadtest, config, ray_service, out)
        while not (out / "requests.csv").exists() or len((out / "requests.csv").read_text().splitlines()) < 15:
            assert not run.done() and time.monotonic() - started < 180, "the load test did not get going"
            time.sleep(0.5)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.time()  # the clock of requests.csv's start_s
        run.result(timeout=400)  # raises if Locust failed, TimeoutError if the load test hung

    rows = read_records(out / "requests.csv")
    failed = [r for r in rows if r["status"] != 200 or r["error"]]
    # Requests sent in the first seconds after the kill may still reach the dead replica;
    # from RECOVERY_S on, every one must be answered (the run is about 6 s on a quiet machine).
    after_kill = [r for r in rows if r["start_s"] > killed_at + RECOVERY_S]
    assert len(rows) == 120 and len(failed) < len(rows) / 2
    assert len(after_kill) >= 10, "too few requests after the kill to tell"
    assert all(r["status"] == 200 and not r["error"] for r in after_kill), "the service did not keep answering"
    assert all(r["e2e_ms"] <= 32_000 for r in rows), "a request outlived its 30 s timeout"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == len(failed)
    print(f"replica killed under load: {len(failed)} of {len(rows)} requests failed:", summary["failures"])

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = serve.status().applications["vllm-plugins"].deployments["PluginServer"]
        replicas = _replicas()
        if status.status == "HEALTHY" and len(replicas) == 2 and victim["actor_id"] not in {r["actor_id"] for r in replicas}:
            break
        time.sleep(2)
    else:
        pytest.fail("Ray Serve did not bring the killed replica back")
    for model in (BASE, "para-1", "iapt-1"):
        assert _greedy(ray_service, model, PROMPTS[1]) == _greedy(server, model, PROMPTS[1])
