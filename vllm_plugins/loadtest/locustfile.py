"""Locust users for a multi-tenant load test of an OpenAI-compatible vLLM server.

One user class per adapter method (base model, stock LoRA, FanLoRA, IAPT, PARA, MiLoRA),
all against the same server in the same run. Each user streams completions in a closed
loop, for its method's tenants picked by Zipf popularity, with prompt and output lengths
drawn from the spec's distributions (``ignore_eos`` makes the drawn output length exact).
Every request becomes one CSV row: TTFT, mean inter-token latency, end-to-end latency,
tokens, tenant, method, status, and for a failed request its ``error`` (see
:func:`read_stream`): an HTTP status other than 200, an ``error`` event in the stream, a
stream cut before its final usage chunk or ``[DONE]``, or fewer tokens than asked with
``ignore_eos``. Locust counts the same requests as failures.

A server started with ``--api-key`` gets ``Authorization: Bearer $OPENAI_API_KEY`` on every
request when that variable is set, as ``vllm bench serve`` sends it.

Run through ``vllm-plugins loadtest`` (vllm_plugins/loadtest/runner.py), which writes the
spec to ``$VLLM_PLUGINS_LOADTEST_SPEC``, names the CSV in
``$VLLM_PLUGINS_LOADTEST_RECORDS`` and passes the user classes of the methods present.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from pathlib import Path

import gevent
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

from vllm_plugins.loadtest.spec import METHODS, LoadTestSpec, user_class_name, zipf_weights

SPEC = LoadTestSpec.model_validate_json(Path(os.environ["VLLM_PLUGINS_LOADTEST_SPEC"]).read_text())
RECORD_FIELDS = (
    "start_s", "method", "tenant", "model", "status", "error",
    "ttft_ms", "itl_ms", "e2e_ms", "prompt_tokens", "output_tokens", "requested_tokens",
)


class Records:
    """The run's CSV, and the request budget shared by every user."""

    def __init__(self, path: Path):
        self.file = open(path, "w", newline="")  # noqa: SIM115 (closed when Locust quits)
        self.writer = csv.DictWriter(self.file, fieldnames=RECORD_FIELDS)
        self.writer.writeheader()
        self.started = 0
        self.finished = 0

    def reserve(self) -> bool:
        if self.started >= SPEC.max_requests:
            return False
        self.started += 1
        return True

    def write(self, row: dict) -> bool:
        """Record a finished request; True once the budget is used up."""
        self.writer.writerow(row)
        self.file.flush()
        self.finished += 1
        return self.finished >= SPEC.max_requests


RECORDS = Records(Path(os.environ["VLLM_PLUGINS_LOADTEST_RECORDS"]))


@events.quitting.add_listener
def _close_records(environment, **kwargs) -> None:
    RECORDS.file.close()


class TenantUser(HttpUser):
    abstract = True
    method: str
    wait_time = constant(0)

    def on_start(self) -> None:
        self.rng = random.Random(f"{SPEC.seed}/{self.method}/{id(self)}")
        self.tenants = SPEC.tenants_of(self.method)
        self.weights = zipf_weights(len(self.tenants), SPEC.zipf_exponent)
        if api_key := os.environ.get("OPENAI_API_KEY"):
            self.client.headers["Authorization"] = f"Bearer {api_key}"

    @task
    def complete(self) -> None:
        if not RECORDS.reserve():
            raise StopUser()
        tenant = self.rng.choices(self.tenants, self.weights)[0]
        prompt = " ".join(self.rng.choice(SPEC.words) for _ in range(SPEC.prompt.sample(self.rng)))
        max_tokens = SPEC.output.sample(self.rng)
        row = {"start_s": time.time(), "method": self.method, "tenant": tenant.name, "model": tenant.model,
               "requested_tokens": max_tokens, "status": 0, "error": ""}
        began = time.perf_counter()
        row.update(self._stream(tenant.model, prompt, max_tokens))
        row.setdefault("e2e_ms", (time.perf_counter() - began) * 1e3)  # a failed request: until it failed
        if RECORDS.write(row):
            # From a greenlet of its own: quit() stops every user gracefully, this one too, and
            # from inside this task it waited for itself until the run-time limit (seen: 90 s idle).
            gevent.spawn(self.environment.runner.quit)

    def _stream(self, model: str, prompt: str, max_tokens: int) -> dict:
        """Send one streamed completion; its status, and its figures or why it failed."""
        body = {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }
        began = time.perf_counter()
        result: dict = {"status": 0, "error": ""}
        try:
            with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                                  timeout=SPEC.request_timeout_s, name=self.method) as resp:
                result["status"] = resp.status_code
                try:
                    if resp.error:  # no response: connection refused or reset
                        raise resp.error
                    if resp.status_code != 200:
                        raise FailedRequest(resp.text or "no body")
                    result.update(read_stream(resp.iter_lines(), body, began))
                    resp.success()
                except Exception as err:  # a bad status or stream, a reset connection: a failed request
                    result["error"] = describe(err)
                    resp.failure(result["error"])
        except Exception as err:  # the request could not be sent at all
            result["error"] = describe(err)
        return result


class FailedRequest(Exception):
    """A request that counts as failed; its message is the ``error`` column of requests.csv."""


def describe(err: Exception) -> str:
    return (str(err) if isinstance(err, FailedRequest) else f"{type(err).__name__}: {err}")[:300]


def read_stream(lines, body: dict, began: float) -> dict:
    """TTFT, mean inter-token latency, end-to-end latency and token counts of one completion
    streamed as server-sent events (``data: {...}`` lines, then ``data: [DONE]``).

    Raises FailedRequest for a stream that carries an ``error`` event, one that ends (or
    times out) before its final usage chunk or ``[DONE]``, one without tokens, and one with
    fewer completion tokens than ``max_tokens`` when ``body`` set ``ignore_eos``.
    """
    deadline = began + SPEC.request_timeout_s
    first = last = None
    usage: dict = {}
    for line in lines:
        if time.perf_counter() > deadline:
            raise FailedRequest(f"timed out after {SPEC.request_timeout_s} s")
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        chunk = json.loads(line[len(b"data: "):])
        if "error" in chunk:
            error = chunk["error"]
            raise FailedRequest(f"error event: {error.get('message', error) if isinstance(error, dict) else error}")
        if chunk.get("choices"):
            last = time.perf_counter()
            first = first or last
        usage = chunk.get("usage") or usage
    else:  # the lines ran out before [DONE]
        raise FailedRequest("stream ended without [DONE]")
    end = time.perf_counter()
    if "completion_tokens" not in usage:
        raise FailedRequest("stream ended without its final usage chunk")
    tokens = usage["completion_tokens"]
    if first is None:
        raise FailedRequest("stream ended without tokens")
    if body.get("ignore_eos") and tokens < body["max_tokens"]:
        raise FailedRequest(f"fewer completion tokens than asked with ignore_eos ({tokens} of {body['max_tokens']})")
    return {
        "ttft_ms": (first - began) * 1e3,
        "itl_ms": (last - first) * 1e3 / (tokens - 1) if tokens > 1 else "",
        "e2e_ms": (end - began) * 1e3,
        "prompt_tokens": usage.get("prompt_tokens", ""),
        "output_tokens": tokens,
    }


# One user class per method (BaseUser, LoraUser, FanloraUser, IaptUser, ParaUser, MiloraUser),
# weighted by the spec's method_weights.
for _method in METHODS:
    globals()[user_class_name(_method)] = type(
        user_class_name(_method), (TenantUser,),
        {"method": _method, "weight": max(1, round(10 * SPEC.method_weights.get(_method, 1.0)))},
    )
