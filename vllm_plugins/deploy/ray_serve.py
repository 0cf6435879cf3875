"""``vllm-plugins serve`` on Ray Serve, one server per replica, behind an OpenAI router.

Decision: a Ray Serve deployment around vLLM's own OpenAI server (the one
``vllm-plugins serve`` runs, with the plugins' scheduler, worker and front end), not Ray
Serve LLM (``ray.serve.llm``). Ray Serve LLM runs its own OpenAI layer in front of the
engine. That layer has neither the plugins' front end, which resolves ``model=<adapter>``
to a prompt-aware adapter, validates it and serves ``/v1/load_prompt_adapter``, nor a way
to pass ``--scheduler-cls`` / ``--worker-cls`` through its LoRA-only adapter routing. So
each replica here runs the same server a user runs without Ray, and the router only moves
bytes.

Routing: every ``/v1/*`` request that names a ``model`` goes through Ray Serve's model
multiplexing with that name as the model id. A replica that has already served the
adapter (so vLLM holds it) is preferred; otherwise the least-loaded replica takes it and
loads it. The base model's name routes the same way. The client's ``Authorization`` and
``Content-Type`` headers reach the replica's server, and no other header: the servers
check the API key (``--api-key`` among ``serve_args``), the router never does. A request
whose replica fails before its server answers (the replica died, its server is gone) gets
a 502 in the OpenAI error format, naming the error; the router logs it.

Run-time loading (``POST /v1/load_prompt_adapter`` and ``/v1/unload_prompt_adapter``,
with ``--runtime-loading`` among ``serve_args``) applies to every replica and to replicas
started later. Decision: the router broadcasts the request, and the deployment keeps a
record that replicas replay.

* Broadcast: the router sends the client's request, with its ``Authorization``, to every
  running replica at once (``DeploymentHandle.broadcast``, Ray Serve 2.60), one
  operation at a time. The answer is 200 only if every replica's server answered 200;
  otherwise it is the first refusal, status and body as the server wrote them, and the
  replicas that had accepted are put back as they were (see Reconcile). A replica that
  died meanwhile is skipped: its replacement replays the record.
* Record: a small Ray actor (:class:`AdapterLedger`) holds, per adapter name touched at
  run time, the directory it was last loaded from or "unloaded". It is a
  deployment-scoped actor of the replicas' deployment (``deployment_actors``,
  ``serve.get_deployment_actor``): Serve starts it before the replicas, keeps it across
  replica restarts, recreates it if it dies and deletes it with the application. An
  operation is recorded only after every replica accepted it. Enumerating replicas
  from the router is not needed, nor a registry of replicas: each replica reads the record.
* Reconcile: a replica's server holds the adapters it started with (the adapter
  directory) changed by the record. Before its constructor returns, so before it takes
  traffic, a new replica (scale-up, or the replacement of a crashed one) loads and
  unloads what the record says; then every ``SYNC_PERIOD_S`` it checks the record's
  version and reconciles again when it changed. That catches a replica that was starting
  while an operation was broadcast (it read the record before, and was not yet among the
  replicas the router reached). Reconciling compares the server's own ``/v1/models``
  (each prompt adapter's source directory) with that target, so it is idempotent.
* Authorization: the client's operation is checked by every server with the client's
  header. Replays and reconciles are the replica's own, with the key from its own
  ``serve_args`` (or ``VLLM_API_KEY``); they only ever move a server towards what the
  record holds, and the record holds only operations every server accepted from the
  client.
* If the record's actor dies, Serve starts an empty one; the first replica to notice
  gives it back the copy it last reconciled to (names the new record lacks), so the
  record survives as long as one replica does.
* Limits: one router replica (the default here) serialises the operations; with more,
  concurrent operations still converge at the next reconcile. A load under a name that
  exists is refused (400) by every server, as on a plain server: reloading a name is
  unload, then load.

Health: a replica whose server process has died fails its health check, and Ray Serve
replaces it. The server dies with its replica (``ServerProcess``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import string
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from ray import serve
from ray.serve.config import DeploymentActorConfig
from ray.serve.handle import DeploymentHandle

from vllm_plugins import paths as plugin_paths
from vllm_plugins.config_reader import ConfigModel, read_config
from vllm_plugins.serving.process import ServerProcess

MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions")
LOAD, UNLOAD = "/v1/load_prompt_adapter", "/v1/unload_prompt_adapter"
ADMIN_ROUTES = (LOAD, UNLOAD)  # applied on every replica, and recorded
FORWARDED_HEADERS = ("authorization", "content-type")  # the client's headers a server gets
ROUTER_MAX_ONGOING = 4096
LEDGER = "prompt-adapter-ledger"  # the deployment-scoped actor holding the record
SYNC_PERIOD_S = 2.0  # how often a replica checks the record's version
ADMIN_TIMEOUT_S = 120.0  # for a load or unload on every replica
LEDGER_WAIT_S = 60.0  # how long a replica waits for the record's actor to be reachable
# vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s by default),
# and httpx keeps an idle one 5 s too: a request sent on a connection as the server closes
# it fails ("Server disconnected without sending a response"). The replica drops its idle
# connections well before the server does.
KEEPALIVE_S = 1.0

logger = logging.getLogger("ray.serve")


class RayServeConfig(ConfigModel):
    """The ``args`` of the application in a Serve config file (configs/ray-serve-*.yaml)."""

    model: str  # a model directory, or "demo:<preset>" for the embedded demo model (built by `make demo`)
    adapter_dir: str
    serve_args: tuple[str, ...] = ()  # more `vllm-plugins serve` / `vllm serve` flags
    num_replicas: int = Field(2, ge=1)  # a fixed count, unless `autoscaling` is given
    autoscaling: dict | None = None  # Ray Serve's autoscaling_config, replacing num_replicas
    max_adapters_per_replica: int = Field(16, ge=1)  # adapters a replica is preferred for (multiplexing LRU)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus_per_replica: float = Field(1, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0)  # 1: each replica takes a GPU of its node (its server's device)
    max_replicas_per_node: int | None = Field(None, ge=1)  # 1: at most one replica per node

    @classmethod
    def from_args(cls, args: dict) -> RayServeConfig:
        """From a config file's ``args``. In paths, ``~`` and ``${VARS}`` are expanded, and
        ``${VLLM_PLUGINS_HOME}`` defaults to the project's cache (``~/.cache/vllm-plugins``).
        ValueError for unknown or bad args."""
        config = read_config(cls, args, "Ray Serve application args")
        variables = {"VLLM_PLUGINS_HOME": str(plugin_paths.home()), **os.environ}
        model, adapter_dir = (os.path.expanduser(string.Template(path).safe_substitute(variables))
                              for path in (config.model, config.adapter_dir))
        if model.startswith("demo:"):
            from vllm_plugins.demo_model import PRESETS, demo_model_path

            preset = model.removeprefix("demo:")
            if preset not in PRESETS:
                raise ValueError(f"unknown demo model preset {preset!r}; presets: {', '.join(PRESETS)}")
            model = str(demo_model_path(PRESETS[preset]))
        return config.model_copy(update={"model": model, "adapter_dir": adapter_dir})


def _error_body(status: int, message: str) -> dict:
    """An error the router makes itself, in the OpenAI error format (as vLLM types them)."""
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "code": status}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(_error_body(status, message), status_code=status)


def api_key_of(serve_args: list[str]) -> str | None:
    """The server's API key, as vLLM picks it: the first ``--api-key`` value, else
    ``VLLM_API_KEY``."""
    for i, arg in enumerate(serve_args):
        if arg == "--api-key" and i + 1 < len(serve_args):
            return serve_args[i + 1]
        if arg.startswith("--api-key="):
            return arg.removeprefix("--api-key=")
    return os.environ.get("VLLM_API_KEY") or None


class Reply(NamedTuple):
    """A server's whole answer, and which replica it came from."""

    status: int
    body: bytes
    content_type: str
    replica: str

    @classmethod
    def error(cls, status: int, message: str) -> Reply:
        """An answer the router makes itself, in the OpenAI error format."""
        return cls(status, json.dumps(_error_body(status, message)).encode(), "application/json", "")

    def response(self) -> Response:
        return Response(content=self.body, status_code=self.status, media_type=self.content_type)


class AdapterLedger:
    """The record of run-time loads (a Ray actor, one per deployment): adapter name ->
    the directory it was last loaded from, or None once unloaded. Names are never
    dropped, so an unload of an adapter the servers start with is replayed too."""

    def __init__(self):
        self.epoch = uuid.uuid4().hex  # a new one if Serve recreates this actor
        self.version = 0
        self.adapters: dict[str, str | None] = {}

    def read(self) -> tuple[str, int, dict[str, str | None]]:
        return self.epoch, self.version, dict(self.adapters)

    def record(self, name: str, path: str | None) -> int:
        self.adapters[name] = path
        self.version += 1
        return self.version

    def restore(self, adapters: dict[str, str | None]) -> tuple[str, int, dict[str, str | None]]:
        """Take back the names this record lacks from a replica's copy of an earlier
        instance's record (after this actor was recreated); names recorded since win."""
        missing = {name: path for name, path in adapters.items() if name not in self.adapters}
        if missing:
            self.adapters.update(missing)
            self.version += 1
        return self.read()


class PluginServer:
    """A replica: one ``vllm-plugins serve`` process on a loopback port, a relay, and the
    reconcile of the server's adapters with the deployment's record."""

    async def __init__(self, config: RayServeConfig):
        log = Path(tempfile.mkdtemp(prefix="vllm-plugins-replica-")) / "server.log"
        # Started on this thread, as before: the server's PR_SET_PDEATHSIG follows the
        # thread that started it, and this one lives as long as the replica.
        self.server = ServerProcess.start(Path(config.model), Path(config.adapter_dir), log, *config.serve_args)
        self.client = httpx.AsyncClient(base_url=self.server.url, timeout=None, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S))
        key = api_key_of(config.serve_args)
        self.own_headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        self.tag = serve.get_replica_context().replica_tag
        self.lock = asyncio.Lock()  # one load, unload or reconcile at a time on this server
        self.ledger = None
        self.seen: tuple[str | None, int, dict] = (None, -1, {})  # the record this server matches
        self.startup = await self._served()  # the prompt adapters the server started with
        await self.sync(force=True)  # the record's loads, before this replica takes traffic
        self.syncing = asyncio.get_running_loop().create_task(self._keep_in_sync())

    async def adapter(self, model_id: str) -> str:
        """Multiplexing's load hook: vLLM loads the adapter on its first request, so there
        is nothing to do but be recorded as the replica that holds it."""
        return model_id

    async def relay(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[bytes | tuple[int, str]]:
        """The server's reply: first ``(status, content type)``, then the body's chunks."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)
        async with self.client.stream(method, path, content=body, headers=headers) as reply:
            yield reply.status_code, reply.headers.get("content-type", "application/json")
            async for chunk in reply.aiter_raw():
                yield chunk

    async def call(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        """One whole request to this replica's server (what the router broadcasts)."""
        if path in ADMIN_ROUTES:
            async with self.lock:
                return await self._call(method, path, body, headers)
        return await self._call(method, path, body, headers)

    async def _call(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        reply = await self.client.request(method, path, content=body, headers=headers, timeout=ADMIN_TIMEOUT_S)
        return Reply(reply.status_code, reply.content, reply.headers.get("content-type", "application/json"), self.tag)

    async def remember(self, name: str, path: str | None) -> int:
        """Record a load (``path``) or an unload (None) every replica accepted."""
        return await self._ledger("record", name, path)

    async def sync(self, force: bool = False) -> None:
        """Bring the server to the record: its start-up adapters, changed by every load
        and unload recorded. Only when the record changed since, unless ``force``."""
        async with self.lock:
            epoch, version, record = await self._ledger("read")
            seen_epoch, seen_version, seen_record = self.seen
            if seen_epoch is not None and epoch != seen_epoch and seen_record:
                epoch, version, record = await self._ledger("restore", seen_record)
            if not force and (epoch, version) == (seen_epoch, seen_version):
                return
            served = await self._served()
            target = {**self.startup, **{name: _resolved(path) for name, path in record.items()}}
            changed = []
            for name in sorted(set(served) | set(target)):
                have, want = served.get(name), target.get(name)
                if have == want:
                    continue
                if have is not None:
                    changed.append(await self._own(UNLOAD, {"adapter_name": name}))
                if want is not None:
                    changed.append(await self._own(LOAD, {"adapter_name": name, "adapter_path": record.get(name) or want}))
            if changed:
                logger.info("replica %s reconciled with the record (version %d): %s", self.tag, version, "; ".join(changed))
            self.seen = (epoch, version, record)

    async def _keep_in_sync(self) -> None:
        while True:
            await asyncio.sleep(SYNC_PERIOD_S)
            try:
                await self.sync()
            except Exception:  # the record's actor being recreated, the server busy: next time
                logger.warning("replica %s could not reconcile its adapters with the record", self.tag, exc_info=True)

    async def _own(self, path: str, body: dict) -> str:
        """A load or unload of the replica's own (its API key, not a client's); what it did."""
        reply = await self._call("POST", path, json.dumps(body).encode(), self.own_headers)
        if reply.status != 200:
            logger.warning("replica %s: %s %s answered %d: %s", self.tag, path, body, reply.status, reply.body[:500])
        return f"{path.removeprefix('/v1/').removesuffix('_prompt_adapter')} {body['adapter_name']}: {reply.status}"

    async def _served(self) -> dict[str, str]:
        """The server's prompt adapters: name -> the directory it was loaded from."""
        reply = await self._call("GET", "/v1/models", b"", self.own_headers)
        if reply.status != 200:
            raise RuntimeError(
                f"the replica's server answered GET /v1/models with {reply.status} ({reply.body[:300]!r}); "
                "with --api-key, give the key in serve_args or VLLM_API_KEY"
            )
        return {m["id"]: m["root"] for m in json.loads(reply.body)["data"] if "method" in m and m.get("root")}

    async def _ledger(self, method: str, *args):
        """Call the record's actor, waiting while Serve (re)creates it."""
        deadline = time.monotonic() + LEDGER_WAIT_S
        while True:
            try:
                if self.ledger is None:
                    self.ledger = serve.get_deployment_actor(LEDGER)
                return await getattr(self.ledger, method).remote(*args)
            except (ValueError, ray.exceptions.RayActorError):
                self.ledger = None
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

    def check_health(self) -> None:
        if not self.server.alive():
            raise RuntimeError(f"the replica's server exited with {self.server.proc.returncode}")

    def __del__(self) -> None:
        """Serve's graceful shutdown: stop the server and drop its log (a replica that
        died another way leaves its log in the temporary folder)."""
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
            shutil.rmtree(server.log.parent, ignore_errors=True)


def _resolved(path: str | None) -> str | None:
    """A directory as the server names it in ``/v1/models`` (resolved)."""
    return None if path is None else str(Path(path).resolve())


router_app = FastAPI()


@serve.ingress(router_app)
class OpenAIRouter:
    """The HTTP entry point: OpenAI routes, relayed to a replica chosen by adapter; loads
    and unloads, applied on every replica and recorded."""

    def __init__(self, replicas: DeploymentHandle):
        self.replicas = replicas
        self.admin_lock = asyncio.Lock()

    @router_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def route(self, path: str, request: Request) -> Response:
        body = await request.body()
        path = "/" + path
        headers = {name: value for name in FORWARDED_HEADERS if (value := request.headers.get(name))}
        headers.setdefault("content-type", "application/json")
        if request.method == "POST" and path in ADMIN_ROUTES:
            return await self._everywhere(path, body, headers)
        options: dict = {"stream": True}
        if path in MODEL_ROUTES:
            try:
                model = json.loads(body or b"{}").get("model")
            except (json.JSONDecodeError, AttributeError):
                return _error(400, "the request body is not a JSON object")
            if not isinstance(model, str) or not model:
                return _error(400, "the request names no model")
            options["multiplexed_model_id"] = model
        reply = self.replicas.options(**options).relay.remote(request.method, path, body, headers)
        try:
            status, media_type = await reply.__anext__()
        except Exception as err:  # the replica died, or could not reach its server
            logger.warning("relaying %s %s failed", request.method, path, exc_info=True)
            return _error(502, f"the replica failed: {type(err).__name__}")
        return StreamingResponse(reply, status_code=status, media_type=media_type)

    async def _everywhere(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """A load or unload on every replica: 200 if all accepted (then it is recorded),
        else the first refusal, and the replicas that accepted are reconciled back."""
        async with self.admin_lock:
            try:
                results = await self.replicas.broadcast("call", "POST", path, body, headers).results_async(
                    timeout_s=ADMIN_TIMEOUT_S, return_exceptions=True)
            except Exception as err:  # no replica running, or the broadcast timed out
                await self._reconcile_all()
                return _error(503, f"the operation did not reach every replica: {err}")
            replies: list[Reply] = []
            for result in results:
                if isinstance(result, ray.exceptions.RayActorError):
                    continue  # died or unreachable: its replacement (or itself) reconciles to the record
                replies.append(result if isinstance(result, Reply) else Reply.error(502, f"a replica failed: {result}"))
            refused = [r for r in replies if r.status != 200]
            if replies and not refused:
                request = json.loads(body)
                try:
                    await self.replicas.remember.remote(request["adapter_name"], request["adapter_path"] if path == LOAD else None)
                    return replies[0].response()
                except Exception as err:
                    refused = [Reply.error(503, f"not recorded: {err}")]
            if any(r.status == 200 for r in replies):
                await self._reconcile_all()
            return refused[0].response() if refused else _error(503, "no replica answered")

    async def _reconcile_all(self) -> None:
        """Every replica back to the record (undoes an operation some replicas accepted)."""
        try:
            await self.replicas.broadcast("sync", True).results_async(timeout_s=ADMIN_TIMEOUT_S, return_exceptions=True)
        except Exception:
            logger.warning("the replicas could not be reconciled with the record", exc_info=True)


def _multiplexed(max_adapters: int) -> type[PluginServer]:
    """PluginServer whose adapter hook is Ray Serve's multiplexed loader, remembering the
    ``max_adapters`` most recently used adapters per replica."""

    class MultiplexedPluginServer(PluginServer):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, model_id: str) -> str:
            return await super().adapter(model_id)

    return MultiplexedPluginServer


def build_app(config: RayServeConfig):
    """The Serve application: the router in front of the replicas' servers, and the
    record of run-time loads beside the replicas."""
    scaling = {"autoscaling_config": config.autoscaling} if config.autoscaling else {"num_replicas": config.num_replicas}
    ledger = DeploymentActorConfig(name=LEDGER, actor_class=ray.remote(AdapterLedger), actor_options={"num_cpus": 0})
    replica = serve.deployment(
        _multiplexed(config.max_adapters_per_replica),
        name="PluginServer",
        max_ongoing_requests=config.max_ongoing_requests,
        max_replicas_per_node=config.max_replicas_per_node,
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        health_check_period_s=2,
        health_check_timeout_s=30,
        deployment_actors=[ledger],
        **scaling,
    )
    # The router only relays, so it never queues: Serve's default (5 requests in flight per
    # replica) would hold clients back in front of idle servers. Back-pressure is at the servers.
    router = serve.deployment(OpenAIRouter, name="OpenAIRouter", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=ROUTER_MAX_ONGOING)
    return router.bind(replica.bind(config))


def app_builder(args: dict):
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path`` in the config)."""
    return build_app(RayServeConfig.from_args(args))
