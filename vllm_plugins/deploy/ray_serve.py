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
loads it. The base model's name routes the same way.

Health: a replica whose server process has died fails its health check, and Ray Serve
replaces it. The server dies with its replica (``ServerProcess``).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from vllm_plugins import paths as plugin_paths
from vllm_plugins.serving.process import ServerProcess

MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions")
ROUTER_MAX_ONGOING = 4096


@dataclass(frozen=True)
class RayServeConfig:
    """The ``args`` of the application in a Serve config file (configs/ray-serve-*.yaml)."""

    model: str  # a model directory, or "demo:<preset>" for the embedded demo model (built by `make demo`)
    adapter_dir: str
    serve_args: list[str] = field(default_factory=list)  # more `vllm-plugins serve` / `vllm serve` flags
    num_replicas: int = 2  # a fixed count, unless `autoscaling` is given
    autoscaling: dict | None = None  # Ray Serve's autoscaling_config, replacing num_replicas
    max_adapters_per_replica: int = 16  # adapters a replica is preferred for (multiplexing LRU)
    max_ongoing_requests: int = 64
    num_cpus_per_replica: float = 1
    max_replicas_per_node: int | None = None  # 1: at most one replica per node

    @classmethod
    def from_args(cls, args: dict) -> RayServeConfig:
        """From a config file's ``args``. In paths, ``~`` and ``${VARS}`` are expanded, and
        ``${VLLM_PLUGINS_HOME}`` defaults to the project's cache (``~/.cache/vllm-plugins``)."""
        unknown = sorted(set(args) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown Ray Serve application args: {unknown}")
        variables = {"VLLM_PLUGINS_HOME": str(plugin_paths.home()), **os.environ}
        paths = {
            k: os.path.expanduser(string.Template(args[k]).safe_substitute(variables))
            for k in ("model", "adapter_dir") if k in args
        }
        if paths.get("model", "").startswith("demo:"):
            from vllm_plugins.demo_model import PRESETS, demo_model_path

            preset = paths["model"].removeprefix("demo:")
            if preset not in PRESETS:
                raise ValueError(f"unknown demo model preset {preset!r}; presets: {', '.join(PRESETS)}")
            paths["model"] = str(demo_model_path(PRESETS[preset]))
        return cls(**{**args, **paths})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status_code=status)


class PluginServer:
    """A replica: one ``vllm-plugins serve`` process on a loopback port, and a relay."""

    def __init__(self, config: RayServeConfig):
        log = Path(tempfile.mkdtemp(prefix="vllm-plugins-replica-")) / "server.log"
        self.server = ServerProcess.start(Path(config.model), Path(config.adapter_dir), log, *config.serve_args)
        self.client = httpx.AsyncClient(base_url=self.server.url, timeout=None)

    async def adapter(self, model_id: str) -> str:
        """Multiplexing's load hook: vLLM loads the adapter on its first request, so there
        is nothing to do but be recorded as the replica that holds it."""
        return model_id

    async def relay(self, method: str, path: str, body: bytes) -> AsyncIterator[bytes | tuple[int, str]]:
        """The server's reply: first ``(status, content type)``, then the body's chunks."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)
        async with self.client.stream(method, path, content=body, headers={"Content-Type": "application/json"}) as reply:
            yield reply.status_code, reply.headers.get("content-type", "application/json")
            async for chunk in reply.aiter_raw():
                yield chunk

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


router_app = FastAPI()


@serve.ingress(router_app)
class OpenAIRouter:
    """The HTTP entry point: OpenAI routes, relayed to a replica chosen by adapter."""

    def __init__(self, replicas: DeploymentHandle):
        self.replicas = replicas

    @router_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def route(self, path: str, request: Request) -> Response:
        body = await request.body()
        options: dict = {"stream": True}
        if "/" + path in MODEL_ROUTES:
            try:
                model = json.loads(body or b"{}").get("model")
            except (json.JSONDecodeError, AttributeError):
                return _error(400, "the request body is not a JSON object")
            if not isinstance(model, str) or not model:
                return _error(400, "the request names no model")
            options["multiplexed_model_id"] = model
        reply = self.replicas.options(**options).relay.remote(request.method, "/" + path, body)
        status, media_type = await reply.__anext__()
        return StreamingResponse(reply, status_code=status, media_type=media_type)


def _multiplexed(max_adapters: int) -> type[PluginServer]:
    """PluginServer whose adapter hook is Ray Serve's multiplexed loader, remembering the
    ``max_adapters`` most recently used adapters per replica."""

    class MultiplexedPluginServer(PluginServer):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, model_id: str) -> str:
            return await super().adapter(model_id)

    return MultiplexedPluginServer


def build_app(config: RayServeConfig):
    """The Serve application: the router in front of the replicas' servers."""
    scaling = {"autoscaling_config": config.autoscaling} if config.autoscaling else {"num_replicas": config.num_replicas}
    replica = serve.deployment(
        _multiplexed(config.max_adapters_per_replica),
        name="PluginServer",
        max_ongoing_requests=config.max_ongoing_requests,
        max_replicas_per_node=config.max_replicas_per_node,
        ray_actor_options={"num_cpus": config.num_cpus_per_replica},
        health_check_period_s=2,
        health_check_timeout_s=30,
        **scaling,
    )
    # The router only relays, so it never queues: Serve's default (5 requests in flight per
    # replica) would hold clients back in front of idle servers. Back-pressure is at the servers.
    router = serve.deployment(OpenAIRouter, name="OpenAIRouter", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=ROUTER_MAX_ONGOING)
    return router.bind(replica.bind(config))


def app_builder(args: dict):
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path`` in the config)."""
    return build_app(RayServeConfig.from_args(args))
