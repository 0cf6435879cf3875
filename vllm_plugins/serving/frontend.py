"""``--middleware vllm_plugins.serving.frontend.PromptAdapterMiddleware``.

An ASGI middleware in front of vLLM's OpenAI server that makes prompt-aware adapters
addressable exactly like LoRA adapters:

* ``POST /v1/completions`` and ``/v1/chat/completions`` with ``model=<adapter>``: the
  request is passed on for the base model, with the adapter's name and validated
  directory in ``vllm_xargs`` and a per-adapter ``cache_salt``. Clients may not set those
  ``vllm_xargs`` keys themselves (400). Unknown names reach vLLM unchanged, which answers
  404 as for any unknown model.
* KV eviction settings in ``vllm_xargs`` (``kv_eviction``, ``kv_keep_ratio``,
  ``kv_budget``) are checked before vLLM sees the request: an unknown policy, a ratio
  outside (0, 1] or a budget larger than the prompt (counted by vLLM's own
  ``/tokenize``) is a 400.
* ``GET /v1/models`` lists the prompt-aware adapters too, each with its ``method``.
* ``POST /v1/load_prompt_adapter`` ``{"adapter_name", "adapter_path"}`` and
  ``POST /v1/unload_prompt_adapter`` ``{"adapter_name"}``, when run-time loading is on.

Settings come from vLLM's ``--additional-config`` (:mod:`.config`); the served model from
vLLM's own arguments.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_plugins.adapters.storage import AdapterError
from vllm_plugins.eviction.settings import BUDGET_ARG, KEEP_RATIO_ARG, POLICY_ARG, EvictionSettingsError
from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG
from vllm_plugins.serving.config import PromptAdapterSettings, eviction_settings
from vllm_plugins.serving.kv_eviction import PLAN_ARG
from vllm_plugins.serving.registry import PromptAdapterRegistry
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
RESERVED_XARGS = (ADAPTER_ARG, ADAPTER_PATH_ARG, SOFT_KV_SLOT_ARG, PLAN_ARG)
EVICTION_XARGS = (POLICY_ARG, KEEP_RATIO_ARG, BUDGET_ARG)


def error_body(status: int, message: str, kind: str) -> bytes:
    """An error in the OpenAI format, as vLLM writes it."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _call_app(app, scope: dict, receive, path: str, body: dict) -> tuple[int, Any]:
    """POST ``body`` to ``path`` of ``app`` in-process, on the caller's connection."""
    raw = json.dumps(body).encode()
    sub_scope, receive = _with_body({**scope, "path": path, "raw_path": path.encode(), "query_string": b""}, receive, raw)
    status, chunks = 500, []

    async def capture(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(sub_scope, receive, capture)
    try:
        return status, json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, None


def _with_body(scope: dict, receive, body: bytes) -> tuple[dict, Any]:
    """``scope`` and ``receive`` replaying ``body``; later calls reach the client's own
    ``receive``, so vLLM still hears a real disconnect (and only a real one)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return {**scope, "headers": headers}, replay


class PromptAdapterMiddleware:
    def __init__(self, app):
        self.app = app
        self._registry: PromptAdapterRegistry | None = None
        self._settings: PromptAdapterSettings | None = None

    def _setup(self, scope: dict) -> PromptAdapterRegistry:
        if self._registry is None:
            args = scope["app"].state.args
            self._settings = PromptAdapterSettings.from_additional_config(args.additional_config)
            self._eviction = eviction_settings(args.additional_config)
            self._registry = PromptAdapterRegistry(args.model, self._settings)
            names = args.served_model_name or [args.model]
            self._served_name = names[0] if isinstance(names, list) else names
        return self._registry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        registry = self._setup(scope)
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in GENERATION_PATHS:
            return await self._generation(registry, scope, receive, send)
        if method == "GET" and path == "/v1/models":
            return await self._models(registry, scope, receive, send)
        if method == "POST" and path in ("/v1/load_prompt_adapter", "/v1/unload_prompt_adapter"):
            return await self._load_or_unload(registry, path, receive, send)
        return await self.app(scope, receive, send)

    async def _generation(self, registry, scope, receive, send):
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None  # vLLM answers malformed JSON itself
        if isinstance(body, dict):
            xargs = body.get("vllm_xargs")
            if isinstance(xargs, dict) and any(k in xargs for k in RESERVED_XARGS):
                return await _respond(
                    send, 400, error_body(400, f"vllm_xargs keys {list(RESERVED_XARGS)} are reserved", "BadRequestError")
                )
            adapter = registry.adapters.get(body.get("model")) if isinstance(body.get("model"), str) else None
            if adapter is not None:
                body["model"] = self._served_name
                body["vllm_xargs"] = {**(xargs or {}), ADAPTER_ARG: adapter.name, ADAPTER_PATH_ARG: adapter.path}
                body["cache_salt"] = f"prompt-adapter:{adapter.name}"
                raw = json.dumps(body).encode()
            if isinstance(xargs, dict) and any(k in xargs for k in EVICTION_XARGS):
                error = await self._eviction_error(scope, receive, body, xargs)
                if error is not None:
                    return await _respond(send, 400, error_body(400, error, "BadRequestError"))
        scope, receive = _with_body(scope, receive, raw)
        return await self.app(scope, receive, send)

    async def _eviction_error(self, scope: dict, receive, body: dict, xargs: dict) -> str | None:
        """Why the request's eviction settings cannot be honoured, or None."""
        try:
            rule = self._eviction.rule_for(xargs)
            if rule is None or rule.budget is None:
                return None
            for count in await self._prompt_lengths(scope, receive, body):
                self._eviction.rule_for(xargs, count)
        except EvictionSettingsError as err:
            return str(err)
        return None

    async def _prompt_lengths(self, scope: dict, receive, body: dict) -> list[int]:
        """Each prompt's length in tokens, as vLLM's ``/tokenize`` counts it; prompts it
        cannot count are left to vLLM's own validation."""
        if "messages" in body:
            requests = [{"model": body.get("model"), "messages": body["messages"]}]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return [len(prompt)]
            prompts = prompt if isinstance(prompt, list) else [prompt]
            requests = [{"model": body.get("model"), "prompt": p} for p in prompts if isinstance(p, str)]
        counts = []
        for request in requests:
            status, answer = await _call_app(self.app, scope, receive, "/tokenize", request)
            if status == 200 and isinstance(answer, dict) and isinstance(answer.get("count"), int):
                counts.append(answer["count"])
        return counts

    async def _models(self, registry, scope, receive, send):
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            listing = json.loads(body)
            for adapter in registry.adapters.values():
                listing["data"].append(
                    {
                        "id": adapter.name,
                        "object": "model",
                        "owned_by": "vllm-plugins",
                        "root": adapter.path,
                        "parent": self._served_name,
                        "method": adapter.method,
                    }
                )
            body = json.dumps(listing).encode()
        return await _respond(send, start.get("status", 500), body)

    async def _load_or_unload(self, registry, path, receive, send):
        if not self._settings.runtime_loading:
            message = "run-time adapter loading is off (prompt_adapters.runtime_loading)"
            return await _respond(send, 404, error_body(404, message, "NotFoundError"))
        try:
            body = json.loads(await _read_body(receive))
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("adapter_name"), str):
            return await _respond(send, 400, error_body(400, "expected a JSON object with adapter_name", "BadRequestError"))
        name = body["adapter_name"]
        if path.endswith("/unload_prompt_adapter"):
            if name not in registry.adapters:
                return await _respond(send, 404, error_body(404, f"no prompt adapter named {name!r}", "NotFoundError"))
            registry.unregister(name)
            return await _respond(send, 200, json.dumps({"message": f"prompt adapter {name!r} unloaded"}).encode())
        if not isinstance(body.get("adapter_path"), str):
            return await _respond(send, 400, error_body(400, "expected adapter_path", "BadRequestError"))
        try:
            adapter = registry.register(name, body["adapter_path"])
        except AdapterError as err:
            return await _respond(send, 400, error_body(400, str(err), "BadRequestError"))
        message = f"prompt adapter {adapter.name!r} ({adapter.method}) loaded"
        return await _respond(send, 200, json.dumps({"message": message}).encode())
