"""ASGI plumbing of the front end (:mod:`.frontend`): bounded body reads, OpenAI-format
errors, in-process calls to vLLM's own routes, and the ``model`` field of responses."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
DRAIN_FACTOR = 256
LARGE = 1 << 18  # JSON of this many bytes or more is handled in a worker thread


class HttpError(Exception):
    """A request the front end answers itself, with ``status`` and an OpenAI-format error."""

    KINDS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError"}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def body(self) -> bytes:
        kind = self.KINDS.get(self.status, "BadRequestError")
        return json.dumps({"error": {"message": str(self), "type": kind, "param": None, "code": self.status}}).encode()


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: dict, receive: Receive, limit: int) -> bytes:
    """The request body; :class:`HttpError` 413 once it exceeds ``limit`` bytes (declared
    or received). The rest of an oversized body is drained, not kept or parsed, up to
    :data:`DRAIN_FACTOR` times the limit, so that the client reads the 413."""
    declared = header(scope, b"content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "the client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        too_large = too_large or size > limit
        if not too_large:
            chunks.append(chunk)
        if not message.get("more_body") or size > DRAIN_FACTOR * limit:
            break
    if too_large:
        raise HttpError(413, f"request body of {declared or size} bytes; this server takes at most {limit}")
    return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def with_body(scope: dict, receive: Receive, body: bytes) -> tuple[dict, Receive]:
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


async def call_app(app, scope: dict, receive: Receive, path: str, body: dict) -> tuple[int, Any]:
    """POST ``body`` to ``path`` of ``app`` in-process, on the caller's connection."""
    raw = json.dumps(body).encode()
    sub_scope, sub_receive = with_body({**scope, "path": path, "raw_path": path.encode(), "query_string": b""}, receive, raw)
    status, chunks = 500, []

    async def capture(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(sub_scope, sub_receive, capture)
    try:
        return status, json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, None


def naming_model(send: Send, served: str, tenant: str) -> Send:
    """``send`` with every ``"model": served`` of the response (a JSON body, or each event
    of a server-sent-events stream) replaced by ``tenant``, as vLLM names a LoRA tenant."""
    start: dict = {}
    streaming = False
    buffered = b""

    def rename(text: bytes) -> bytes:
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return text
        if isinstance(body, dict) and body.get("model") == served:
            body["model"] = tenant
            return json.dumps(body).encode()
        return text

    def rename_events(events: bytes) -> bytes:
        out = []
        for event in events.split(b"\n\n"):
            if event.startswith(b"data: ") and not event.startswith(b"data: [DONE]"):
                event = b"data: " + rename(event[len(b"data: "):])
            out.append(event)
        return b"\n\n".join(out)

    async def wrapped(message: dict) -> None:
        nonlocal streaming, buffered
        if message["type"] == "http.response.start":
            start.update(message)
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            streaming = content_type.startswith(b"text/event-stream")
            if streaming:
                await send(message)
            return
        if message["type"] != "http.response.body":
            return await send(message)
        buffered += message.get("body", b"")
        more = message.get("more_body", False)
        if streaming:
            complete, sep, buffered = buffered.rpartition(b"\n\n")
            if sep:
                await send({**message, "body": rename_events(complete) + sep, "more_body": more or bool(buffered)})
            if not more and buffered:
                await send({**message, "body": buffered, "more_body": False})
            elif not more and not sep:
                await send({**message, "body": b"", "more_body": False})
            return
        if more:
            return
        body = await asyncio.to_thread(rename, buffered) if len(buffered) > LARGE else rename(buffered)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped
