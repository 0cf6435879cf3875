"""``--middleware vllm_plugins.serving.frontend.PromptAdapterMiddleware``.

An ASGI middleware in front of vLLM's OpenAI server (outermost: vLLM adds ``--middleware``
classes after its own) that makes prompt-aware adapters addressable exactly like LoRA
adapters:

* ``POST /v1/completions``, ``/v1/chat/completions`` (and SageMaker's ``/invocations``)
  with ``model=<adapter>``: the request is passed on for the base model, with the
  adapter's name, validated snapshot and ticket in ``vllm_xargs`` (:mod:`.tickets`).
  Responses name the adapter in ``model``, streamed chunks included. Unknown names reach
  vLLM unchanged, which answers 404 as for any unknown model.
* Every JSON ``POST``, on every route: a body over the size bound is a 413 before it is
  read; ``vllm_xargs`` must be an object, and its keys that only the front end and the
  scheduler set (adapter, ticket, KV slots, eviction plan) are a 400. The engine drops
  them anyway without a valid ticket: this is the clear error, not the protection.
* KV eviction settings in ``vllm_xargs`` (``kv_eviction``, ``kv_keep_ratio``,
  ``kv_budget``) are checked before vLLM sees the request, on the generation routes only
  (elsewhere they are a 400): an unknown policy, a ratio outside (0, 1] or a budget larger
  than the prompt as the engine will see it (vLLM's own ``/tokenize``, then
  ``truncate_prompt_tokens``) is a 400, and so is any other key that reads as one (``kv``
  in front or ``evict`` inside, in any case: a misspelt setting would otherwise be
  ignored, and the request served with its whole cache).
* ``GET /v1/models`` lists the prompt-aware adapters too, each with its ``method``, and
  under ``prompt_adapters_refused`` the adapters found at start that are not served.
* ``POST /v1/load_prompt_adapter`` ``{"adapter_name", "adapter_path"}`` and
  ``POST /v1/unload_prompt_adapter`` ``{"adapter_name"}``, when run-time loading is on.

``--api-key`` (or ``VLLM_API_KEY``) guards every ``/v1`` route here as vLLM guards its
own, and every other request that is not a read (``GET``, ``HEAD``, ``OPTIONS``) but for
SageMaker's ``POST /ping`` health check, before any work is done: ``/invocations``,
``/tokenize``, and vLLM's admin routes outside ``/v1`` (``/scale_elastic_ep``,
``/reset_prefix_cache``, ``/sleep``, ...), which vLLM itself leaves open. Adapter
validation runs in a worker thread, never on the event loop.

Settings come from vLLM's ``--additional-config`` (:mod:`.config`); the served model from
vLLM's own arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets

from vllm_plugins.adapters.storage import AdapterError
from vllm_plugins.eviction.settings import BUDGET_ARG, KEEP_RATIO_ARG, POLICY_ARG, EvictionSettingsError, shown
from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.asgi import LARGE, HttpError, call_app, header, naming_model, read_body, respond, with_body
from vllm_plugins.serving.config import PromptAdapterSettings, eviction_settings
from vllm_plugins.serving.kv_eviction import PLAN_ARG
from vllm_plugins.serving.registry import PromptAdapterRegistry
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG
from vllm_plugins.serving.tickets import ADAPTER_KEYS, adapter_args

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")
ADMIN_PATHS = ("/v1/load_prompt_adapter", "/v1/unload_prompt_adapter")
READ_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_POSTS = ("/ping",)  # SageMaker's health check, which load balancers call without a key
RESERVED_XARGS = (*ADAPTER_KEYS, SOFT_KV_SLOT_ARG, PLAN_ARG)
EVICTION_XARGS = (POLICY_ARG, KEEP_RATIO_ARG, BUDGET_ARG)
CHAT_TOKENIZE_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                        "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")
"""What shapes a chat prompt's tokens: passed on to ``/tokenize`` to count them."""


def _token_ids(prompt) -> bool:
    """Whether a completions ``prompt`` is one prompt given as token ids."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def body_limit(max_model_len: int) -> int:
    """The largest request body taken, in bytes: 64 per token of the longest prompt (a
    prompt's text or its token ids never take more) plus 64 KiB for the rest."""
    return 64 * max_model_len + (1 << 16)


def _like_eviction_setting(key: str) -> bool:
    """Whether a ``vllm_xargs`` key reads as a KV eviction setting, in any case and spacing
    (``KV_EVICTION``, ``kv-keep-ratio``, ``kvBudget``, ``eviction``): one that is not
    exactly a known setting is a misspelt one, which would otherwise be ignored and the
    request served with its whole cache."""
    name = key.strip().lower()
    return name.startswith("kv") or "evict" in name


class PromptAdapterMiddleware:
    def __init__(self, app):
        self.app = app
        self._registry: PromptAdapterRegistry | None = None
        self._setup_lock = asyncio.Lock()

    async def _setup(self, scope: dict) -> PromptAdapterRegistry:
        async with self._setup_lock:
            if self._registry is None:
                state = scope["app"].state
                args = state.args
                self._settings = PromptAdapterSettings.from_additional_config(args.additional_config)
                self._eviction = eviction_settings(args.additional_config)
                names = args.served_model_name or [args.model]
                names = names if isinstance(names, list) else [names]
                self._served_name = names[0]
                reserved = frozenset([*names, args.model, *(m.name for m in args.lora_modules or [])])
                keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if k]
                self._api_keys = [hashlib.sha256(k.encode()).digest() for k in keys]
                self._body_limit = body_limit(vi.max_model_len(state))
                self._registry = await asyncio.to_thread(PromptAdapterRegistry, args.model, self._settings, reserved)
        return self._registry

    def _authorized(self, scope: dict) -> bool:
        if not self._api_keys:
            return True
        scheme, _, token = (header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any(secrets.compare_digest(digest, key) for key in self._api_keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        registry = await self._setup(scope)
        path, method = scope["path"], scope["method"]
        try:
            guarded = path.startswith("/v1") or (method not in READ_METHODS and path not in OPEN_POSTS)
            if guarded and method != "OPTIONS" and not self._authorized(scope):
                raise HttpError(401, "a valid API key is required (Authorization: Bearer <key>)")
            if method == "GET" and path == "/v1/models":
                return await self._models(registry, scope, receive, send)
            if method != "POST":
                return await self.app(scope, receive, send)
            raw = await read_body(scope, receive, self._body_limit)
            body = await self._parse(raw)
            if path in ADMIN_PATHS:
                return await self._load_or_unload(registry, path, body, send)
            if isinstance(body, dict):
                body, send = await self._checked(registry, scope, receive, send, path, body)
                raw = json.dumps(body).encode()
        except HttpError as err:
            return await respond(send, err.status, err.body())
        scope, receive = with_body(scope, receive, raw)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _parse(raw: bytes):
        """The JSON body, or None (vLLM answers malformed JSON and other bodies itself)."""
        try:
            return await asyncio.to_thread(json.loads, raw) if len(raw) > LARGE else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        except RecursionError:
            raise HttpError(400, "the JSON body is nested too deeply") from None

    async def _checked(self, registry, scope, receive, send, path: str, body: dict):
        """The body vLLM gets, and the ``send`` its answer goes through; HttpError if refused."""
        xargs = body.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise HttpError(400, "vllm_xargs must be a JSON object")
        xargs = xargs or {}
        if reserved := sorted(k for k in RESERVED_XARGS if k in xargs):
            raise HttpError(400, f"vllm_xargs keys {reserved} are reserved for the server")
        if unknown := sorted(k for k in xargs if _like_eviction_setting(k) and k not in EVICTION_XARGS):
            shown_keys = ", ".join(shown(k, 40) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise HttpError(400, f"unknown KV eviction settings in vllm_xargs: {shown_keys}; known: {', '.join(EVICTION_XARGS)}")
        if path == "/v1/load_lora_adapter" and body.get("lora_name") in registry.adapters:
            raise HttpError(400, f"{body['lora_name']!r} is the name of a prompt adapter")
        evicts = any(k in xargs for k in EVICTION_XARGS)
        if path not in GENERATION_PATHS:
            # with a trailing slash vLLM redirects to the route, where the settings are checked
            if evicts and path.rstrip("/") not in GENERATION_PATHS:
                raise HttpError(400, f"KV eviction settings are taken on {', '.join(GENERATION_PATHS)} only")
            return body, send
        if evicts:
            await self._check_eviction(scope, receive, body, xargs)
        adapter = registry.adapters.get(body.get("model")) if isinstance(body.get("model"), str) else None
        if adapter is None:
            return body, send
        body = {**body, "model": self._served_name, "vllm_xargs": {**xargs, **adapter_args(adapter.name, adapter.path)}}
        return body, naming_model(send, self._served_name, adapter.name)

    async def _check_eviction(self, scope: dict, receive, body: dict, xargs: dict) -> None:
        try:
            rule = self._eviction.rule_for(xargs)
            if rule is None or rule.budget is None:
                return
            for count in await self._prompt_lengths(scope, receive, body):
                self._eviction.rule_for(xargs, count)
        except EvictionSettingsError as err:
            raise HttpError(400, str(err)) from None

    async def _prompt_lengths(self, scope: dict, receive, body: dict) -> list[int]:
        """Each prompt's length in tokens as the engine will see it: vLLM's ``/tokenize``
        count, cut to ``truncate_prompt_tokens``. Prompts it cannot count are left to
        vLLM's own validation."""
        if "messages" in body:
            requests = [{k: body[k] for k in CHAT_TOKENIZE_FIELDS if k in body}]
            counts = []
        else:
            prompt = body.get("prompt")
            prompts = [prompt] if _token_ids(prompt) or not isinstance(prompt, list) else prompt
            counts = [len(p) for p in prompts if _token_ids(p)]
            requests = [{"prompt": p, **{k: body[k] for k in ("add_special_tokens",) if k in body}}
                        for p in prompts if isinstance(p, str)]
        for request in requests:  # every tenant shares the served model's tokenizer
            status, answer = await call_app(self.app, scope, receive, "/tokenize", {**request, "model": self._served_name})
            if status == 200 and isinstance(answer, dict) and isinstance(answer.get("count"), int):
                counts.append(answer["count"])
        truncate = body.get("truncate_prompt_tokens")
        if isinstance(truncate, int) and not isinstance(truncate, bool) and truncate >= 0:
            counts = [min(c, truncate) for c in counts]
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
                listing["data"].append({
                    "id": adapter.name, "object": "model", "owned_by": "vllm-plugins", "root": adapter.source,
                    "parent": self._served_name, "method": adapter.method,
                })
            listing["prompt_adapters_refused"] = [{"id": name, "error": why} for name, why in registry.refused.items()]
            body = json.dumps(listing).encode()
        return await respond(send, start.get("status", 500), body)

    async def _load_or_unload(self, registry, path: str, body, send):
        if not self._settings.runtime_loading:
            raise HttpError(404, "run-time adapter loading is off (prompt_adapters.runtime_loading)")
        if not isinstance(body, dict) or not isinstance(body.get("adapter_name"), str):
            raise HttpError(400, "expected a JSON object with adapter_name")
        name = body["adapter_name"]
        if path.endswith("/unload_prompt_adapter"):
            if name not in registry.adapters:
                raise HttpError(404, f"no prompt adapter named {name[:128]!r}")
            registry.unregister(name)
            return await respond(send, 200, json.dumps({"message": f"prompt adapter {name!r} unloaded"}).encode())
        if not isinstance(body.get("adapter_path"), str):
            raise HttpError(400, "expected adapter_path")
        try:
            adapter = await asyncio.to_thread(registry.register, name, body["adapter_path"])
        except AdapterError as err:
            raise HttpError(400, str(err)) from None
        message = f"prompt adapter {adapter.name!r} ({adapter.method}) loaded"
        return await respond(send, 200, json.dumps({"message": message}).encode())
