"""Locust users for a multi-tenant load test of an OpenAI-compatible vLLM server.

One user class per adapter method (base model, stock LoRA, FanLoRA, IAPT, PARA, MiLoRA),
all against the same server in the same run. Each user streams completions in a closed
loop, for its method's tenants picked by Zipf popularity, with prompt and output lengths
drawn from the spec's distributions (``ignore_eos`` makes the drawn output length exact).
Every request becomes one CSV row: TTFT, mean inter-token latency, end-to-end latency,
tokens, tenant, method, status.

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

from locust import HttpUser, constant, events, task
from locust.exception import StopUser

from vllm_plugins.loadtest.spec import METHODS, LoadTestSpec, user_class_name, zipf_weights

SPEC = LoadTestSpec.from_json(Path(os.environ["VLLM_PLUGINS_LOADTEST_SPEC"]).read_text())
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
            self.environment.runner.quit()

    def _stream(self, model: str, prompt: str, max_tokens: int) -> dict:
        body = {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }
        began = time.perf_counter()
        deadline = began + SPEC.request_timeout_s
        first = last = None
        usage: dict = {}
        result: dict = {"status": 0, "error": ""}
        try:
            with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                                  timeout=SPEC.request_timeout_s, name=self.method) as resp:
                result["status"] = resp.status_code
                if resp.status_code != 200:
                    result["error"] = resp.text[:300]
                    resp.failure(result["error"])
                    return result
                for line in resp.iter_lines():
                    if time.perf_counter() > deadline:
                        result["error"] = f"timed out after {SPEC.request_timeout_s} s"
                        resp.failure(result["error"])
                        return result
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[len(b"data: "):])
                    if chunk.get("choices"):
                        last = time.perf_counter()
                        first = first or last
                    usage = chunk.get("usage") or usage
                resp.success()
        except Exception as err:  # connection reset, read timeout: a failed request, not a crash
            result["error"] = f"{type(err).__name__}: {err}"[:300]
            return result
        end = time.perf_counter()
        tokens = usage.get("completion_tokens", 0)
        if first is None:
            result["error"] = "stream ended without tokens"
            return result
        result.update(
            ttft_ms=(first - began) * 1e3,
            itl_ms=(last - first) * 1e3 / (tokens - 1) if tokens > 1 else "",
            e2e_ms=(end - began) * 1e3,
            prompt_tokens=usage.get("prompt_tokens", ""),
            output_tokens=tokens,
        )
        return result


# One user class per method (BaseUser, LoraUser, FanloraUser, IaptUser, ParaUser, MiloraUser),
# weighted by the spec's method_weights.
for _method in METHODS:
    globals()[user_class_name(_method)] = type(
        user_class_name(_method), (TenantUser,),
        {"method": _method, "weight": max(1, round(10 * SPEC.method_weights.get(_method, 1.0)))},
    )
