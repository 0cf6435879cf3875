"""Adapter tickets: how the engine tells the plugin's front end from a client.

A request reaches vLLM's engine with its ``SamplingParams.extra_args``, which clients can
fill on every route vLLM serves (``vllm_xargs``). So the adapter a request names there is
trusted only with a ticket: an HMAC-SHA256, under a key of the server's own, of the
adapter's name and directory. The plugin's front end issues it after it has validated the
adapter; the scheduler (:mod:`.scheduler`) verifies it when the request arrives and
drops the adapter keys of a request whose ticket is missing or wrong, so the worker never
sees an adapter, or a path, that the front end did not validate.

The key is :data:`KEY_ENV` in the environment. The plugin entry point
(:mod:`.plugin`), which vLLM loads in its API server process before it starts the
engine, sets it to 32 random bytes unless it is set already; the engine's processes
inherit it. An offline ``vllm.LLM`` user is its own front end: :func:`adapter_args`
issues the ticket in the process that made the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG

KEY_ENV = "VLLM_PLUGINS_REQUEST_KEY"
TICKET_ARG = "prompt_adapter_ticket"
"""The ``extra_args`` key carrying the ticket (hex)."""
ADAPTER_KEYS = (ADAPTER_ARG, ADAPTER_PATH_ARG, TICKET_ARG)


def ensure_key() -> None:
    """Give this process (and the processes it starts) a ticket key, once."""
    os.environ.setdefault(KEY_ENV, secrets.token_hex(32))


def _ticket(name: str, path: str) -> str:
    key = os.environ.get(KEY_ENV)
    if not key:
        raise RuntimeError(f"{KEY_ENV} is not set: the vllm_plugins entry point was not loaded in this process")
    return hmac.new(key.encode(), f"{name}\0{path}".encode(), hashlib.sha256).hexdigest()


def adapter_args(name: str, path: str) -> dict[str, str]:
    """The ``extra_args`` that make a request use prompt-aware adapter ``name`` stored in
    directory ``path`` (already validated by the caller)."""
    ensure_key()
    return {ADAPTER_ARG: name, ADAPTER_PATH_ARG: path, TICKET_ARG: _ticket(name, path)}


def verified(extra_args: dict) -> bool:
    """Whether ``extra_args`` name an adapter with a valid ticket."""
    name, path, ticket = (extra_args.get(k) for k in ADAPTER_KEYS)
    if not (isinstance(name, str) and isinstance(path, str) and isinstance(ticket, str)):
        return False
    return hmac.compare_digest(ticket, _ticket(name, path))
