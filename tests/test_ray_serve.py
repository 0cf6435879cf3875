"""The plugins' server on Ray Serve, on a real two-node Ray cluster on this machine (a head
and a second node started with ``ray start --address``), each node declaring one logical
GPU as a GPU node would (configs/ray-serve-gpu.yaml): two replicas taking a GPU each, so
one per node (their servers run vLLM's CPU worker here),
answering OpenAI requests for adapters of every kind as a plain server does, and
surviving the loss of a replica under a Locust load test. A run-time load through the
router reaches every replica and the replica that replaces a killed one. The servers
run with ``--api-key``: the client's ``Authorization`` reaches them, and a replacement
replays the loads with its own key."""

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

pytestmark = [pytest.mark.ray, pytest.mark.engine]

BASE = "demo"
APP = "vllm-plugins"
API_KEY = "ray-serve-test-key"  # the replicas' servers' --api-key
LOAD, UNLOAD = "/v1/load_prompt_adapter", "/v1/unload_prompt_adapter"
LATE = "late-para"  # loaded at run time through the router: para-2's directory under a new name
RAY = str(Path(sys.executable).parent / "ray")
PROMPTS = ("c a b = reverse", "x y z w = upper", "d e f g h = count")
MAX_TOKENS = 8
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}  # of a call through the handle


def test_the_record_of_runtime_loads_and_the_replicas_own_key(monkeypatch):
    """Without Ray: what the record keeps, and the key a replica replays loads with."""
    from vllm_plugins.deploy.ray_serve import AdapterLedger, api_key_of

    ledger = AdapterLedger()
    assert ledger.record("a", "/adapters/x") == 1 and ledger.record("iapt-1", None) == 2
    epoch, version, record = ledger.read()
    assert version == 2 and record == {"a": "/adapters/x", "iapt-1": None}
    recreated = AdapterLedger()  # what Serve starts if the record's actor dies
    recreated.record("a", None)  # recorded since: wins over a replica's older copy
    new_epoch, version, record = recreated.restore({"a": "/adapters/x", "b": "/adapters/y"})
    assert new_epoch != epoch and version == 2 and record == {"a": None, "b": "/adapters/y"}
    assert recreated.restore({"a": "/adapters/x"})[1] == 2  # nothing missing: no new version

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert api_key_of(["--dtype", "float32"]) is None
    assert api_key_of(["--api-key", "k1", "k2", "--dtype", "float32"]) == "k1"
    assert api_key_of(["--api-key=k3"]) == "k3"
    monkeypatch.setenv("VLLM_API_KEY", "k4")
    assert api_key_of([]) == "k4" and api_key_of(["--api-key", "k1"]) == "k1"


def test_a_replica_drops_idle_connections_before_its_server_closes_them():
    """Else a relayed request can go out on a connection the server is closing."""
    from vllm import envs

    from vllm_plugins.deploy.ray_serve import KEEPALIVE_S

    assert 0 < KEEPALIVE_S < envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE


def _ray(*args: str) -> None:
    done = subprocess.run([RAY, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second node of one logical GPU each, with the token authentication
    conftest.py sets up."""
    port = free_port()
    common = ["--num-cpus", "2", "--num-gpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
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
    config = RayServeConfig(model=str(tiny_llama), adapter_dir=str(served_adapter_dir),
                            serve_args=[*SERVER_ARGS, "--api-key", API_KEY], num_replicas=2, num_gpus_per_replica=1)
    serve.run(build_app(config), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _where(replica) -> dict:
    import ray

    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": context.get_node_id(), "actor_id": context.get_actor_id(),
            "gpus": context.get_accelerator_ids().get("GPU", [])}


def _replicas() -> list[dict]:
    """The live PluginServer replicas: each one's process, node, actor id, GPU ids and
    replica tag (the ``replica`` of the answers it gives through ``call``)."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    prefix = f"SERVE_REPLICA::{APP}#PluginServer#"
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and entry["name"].startswith(prefix):
            try:
                actor = ray.get_actor(entry["name"], namespace="serve")
                found.append({**ray.get(actor.__ray_call__.remote(_where), timeout=30), "tag": entry["name"].removeprefix(prefix)})
            except (ValueError, ray.exceptions.RayActorError):
                continue  # gone since it was listed
    return found


def _wait_for_replacement(victim: dict) -> None:
    """Until Serve has replaced the killed ``victim``: two replicas running, the victim
    not among them."""
    from ray import serve

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments["PluginServer"]
        states = status.replica_states
        replicas = _replicas()
        if (status.status == "HEALTHY" and all(state == "RUNNING" for state, n in states.items() if n) and sum(states.values()) == 2
                and len(replicas) == 2 and victim["actor_id"] not in {r["actor_id"] for r in replicas}):
            return
        time.sleep(2)
    pytest.fail("Ray Serve did not bring the killed replica back")


def _every_replica(model: str, prompt: str) -> dict[str, tuple[int, dict]]:
    """Each live replica's own answer to a greedy completion for ``model``, by replica
    tag: sent to every replica through the deployment's handle, since the router would
    keep sending an adapter's requests to the replica that served it first."""
    from ray import serve

    from vllm_plugins.deploy.ray_serve import Reply

    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}).encode()
    handle = serve.get_deployment_handle("PluginServer", app_name=APP)
    deadline = time.monotonic() + 120
    while True:  # the handle learns of a new replica, and forgets a dead one, within seconds
        results = handle.broadcast("call", "POST", "/v1/completions", body, HEADERS).results(timeout_s=120, return_exceptions=True)
        answers = {r.replica: (r.status, json.loads(r.body)) for r in results if isinstance(r, Reply)}
        live = {r["tag"] for r in _replicas()}
        if set(answers) == live:
            return answers
        assert time.monotonic() < deadline, f"answered: {sorted(answers)}, live replicas: {sorted(live)}"
        time.sleep(1)


def _texts(answers: dict[str, tuple[int, dict]]) -> set[str]:
    assert all(status == 200 for status, _ in answers.values()), answers
    return {body["choices"][0]["text"] for _, body in answers.values()}


def _request(url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    """:func:`request_json` with the key (a server without ``--api-key`` ignores it)."""
    return request_json(url, body, api_key=API_KEY)


def _greedy(url: str, model: str, prompt: str) -> str:
    """MAX_TOKENS greedy tokens' text (past <eos>: a tiny model may end at once)."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    status, body = _request(f"{url}/v1/completions", body)
    assert status == 200, body
    return body["choices"][0]["text"]


def test_two_nodes_and_a_replica_on_each(ray_service):
    """Each replica holds its node's one GPU, so the two land on different nodes."""
    import ray

    assert sum(node["Alive"] for node in ray.nodes()) == 2
    assert ray.cluster_resources().get("GPU") == 2
    replicas = _replicas()
    assert len(replicas) == 2
    assert len({r["node_id"] for r in replicas}) == 2
    assert all(len(r["gpus"]) == 1 for r in replicas)


def test_every_kind_of_adapter_answers_as_on_a_plain_server(ray_service, server):
    models = [BASE, *SERVED_ADAPTERS]  # base, IAPT, PARA, MiLoRA, stock LoRA
    for model in models:
        for prompt in PROMPTS:
            assert _greedy(ray_service, model, prompt) == _greedy(server, model, prompt), (model, prompt)
    status, listed = _request(f"{ray_service}/v1/models")
    assert status == 200 and {m["id"] for m in listed["data"]} >= set(models)


def test_streaming_through_ray_serve(ray_service, server):
    import httpx

    body = {"model": "iapt-1", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{ray_service}/v1/completions", json=body, headers=HEADERS, timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1]), lines
    chunks = [json.loads(line[len("data: "):])["choices"][0] for line in lines[:-1]]
    # a chunk per engine step; vLLM merges the steps that ran while a slow client read (a loaded machine)
    assert 1 <= len(chunks) <= MAX_TOKENS and chunks[-1]["finish_reason"] == "length"
    assert "".join(c["text"] for c in chunks) == _greedy(server, "iapt-1", PROMPTS[0])


def test_bad_requests_get_openai_errors_through_ray_serve(ray_service):
    status, body = _request(f"{ray_service}/v1/completions", {"model": "nobody", "prompt": "a", "max_tokens": 2})
    assert status == 404 and "nobody" in body["error"]["message"]
    status, body = _request(f"{ray_service}/v1/completions", b"{not json")
    assert status == 400 and body["error"]["message"]
    status, body = _request(f"{ray_service}/v1/completions", {"prompt": "a"})
    assert status == 400 and "model" in body["error"]["message"]
    assert _greedy(ray_service, BASE, PROMPTS[0])


def test_a_load_that_one_replica_refuses_is_undone_on_every_replica(ray_service, served_adapter_dir):
    """Run before any replica is replaced: the router broadcasts to the replicas its handle
    knows, and one that started a moment ago may not be among them yet (the design leaves
    that replica to the next reconcile, so a load behind the router's back would not be
    refused at once)."""
    from ray import serve

    name = "stray-iapt"
    load = {"adapter_name": name, "adapter_path": str(served_adapter_dir / "iapt-2")}
    handle = serve.get_deployment_handle("PluginServer", app_name=APP)
    # Loaded on one replica behind the router's back, so that one refuses the router's load.
    reply = handle.call.remote("POST", LOAD, json.dumps(load).encode(), HEADERS).result(timeout_s=120)
    assert reply.status == 200, reply
    status, body = _request(f"{ray_service}{LOAD}", load)
    assert status == 400 and "already loaded" in body["error"]["message"], body
    # Not recorded, and every replica reconciled with the record: the other replica's
    # accepted load is undone, and the stray one with it.
    assert all(status == 404 for status, _ in _every_replica(name, PROMPTS[0]).values())


def test_a_runtime_load_reaches_every_replica_and_an_unload_too(ray_service, server, served_adapter_dir):
    expected = {_greedy(server, "para-2", PROMPTS[0])}
    assert all(status == 404 for status, _ in _every_replica(LATE, PROMPTS[0]).values())
    load = {"adapter_name": LATE, "adapter_path": str(served_adapter_dir / "para-2")}
    status, body = _request(f"{ray_service}{LOAD}", load)
    assert status == 200, body
    try:
        answers = _every_replica(LATE, PROMPTS[0])
        assert len(answers) == 2 and _texts(answers) == expected
        assert {_greedy(ray_service, LATE, PROMPTS[0])} == expected
        # A second load under the name: every server refuses it, as a plain server does.
        status, body = _request(f"{ray_service}{LOAD}", load)
        assert status == 400 and LATE in body["error"]["message"], body
    finally:
        status, body = _request(f"{ray_service}{UNLOAD}", {"adapter_name": LATE})
    assert status == 200, body
    assert all(status == 404 for status, _ in _every_replica(LATE, PROMPTS[0]).values())


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
        run_loadtest(config, url, tmp_path / name, api_key=API_KEY)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["requests"] == 40 and summary["failed"] == 0, summary["failures"]
        figures[name] = {m: {k: s[k] for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")} for m, s in summary["by_method"].items()}
    print("Ray Serve overhead (same load test, plain server then Ray Serve):", json.dumps(figures, indent=1))


RECOVERY_S = 2


def test_killing_a_replica_under_load(ray_service, server, served_adapter_dir, tmp_path):
    """A replica killed during a load test: the service keeps answering, and the
    replacement replays the run-time loads (with its own --api-key) before taking traffic."""
    load = {"adapter_name": LATE, "adapter_path": str(served_adapter_dir / "para-2")}
    status, body = _request(f"{ray_service}{LOAD}", load)
    assert status == 200, body
    try:
        _kill_under_load_and_wait(ray_service, tmp_path)
        answers = _every_replica(LATE, PROMPTS[0])
        assert len(answers) == 2 and _texts(answers) == {_greedy(server, "para-2", PROMPTS[0])}
        for model in (BASE, "para-1", "iapt-1"):
            assert _greedy(ray_service, model, PROMPTS[1]) == _greedy(server, model, PROMPTS[1])
    finally:
        status, body = _request(f"{ray_service}{UNLOAD}", {"adapter_name": LATE})
    assert status == 200, body


def _kill_under_load_and_wait(ray_service: str, tmp_path: Path) -> None:
    """SIGKILL one replica during a 120-request load test; check the run; wait until Serve
    has replaced the replica."""
    from vllm_plugins.loadtest.runner import run_loadtest

    config = _load_config(tmp_path / "loadtest.toml", requests=120, timeout_s=30)
    out = tmp_path / "run"
    victim = _replicas()[0]
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_loadtest, config, ray_service, out, api_key=API_KEY)
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

    _wait_for_replacement(victim)


def test_the_client_authorization_reaches_the_servers(ray_service, server, served_adapter_dir):
    """The router checks no key and adds none: each server checks the client's own."""
    import httpx

    def post(path: str, body: dict, key: str | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        reply = httpx.post(f"{ray_service}{path}", json=body, headers=headers, timeout=120)
        return reply.status_code, reply.json()

    completion = {"model": BASE, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    assert post("/v1/completions", completion)[0] == 401
    assert post("/v1/completions", completion, "not-the-key")[0] == 401
    status, body = post("/v1/completions", completion, API_KEY)
    assert status == 200 and body["choices"][0]["text"] == _greedy(server, BASE, PROMPTS[0]), body
    assert httpx.get(f"{ray_service}/v1/models", timeout=60).status_code == 401
    assert httpx.get(f"{ray_service}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).status_code == 200

    # A load without the key is refused by the servers and never recorded for replay.
    unkeyed = {"adapter_name": "unkeyed", "adapter_path": str(served_adapter_dir / "para-3")}
    assert post(LOAD, unkeyed)[0] == 401
    assert post(LOAD, unkeyed, "not-the-key")[0] == 401
    assert all(status == 404 for status, _ in _every_replica("unkeyed", PROMPTS[0]).values())
