"""``vllm-plugins demo``: the main job, end to end on this machine.

1. build (or reuse) the embedded demo base model;
2. train (or reuse) the tenants' adapters: prompt-aware ones (IAPT, PARA, MiLoRA, two
   tenants each) and stock LoRA ones (LoRA, FanLoRA, ALoRA), each tenant its own task;
3. score every tenant with and without its adapter in transformers (the reference);
4. serve them all from one ``vllm-plugins serve`` (vLLM's OpenAI server) and send real
   mixed traffic over HTTP: every tenant's held-out prompts and plain base-model prompts,
   all in flight together;
5. report per tenant: accuracy through the server, agreement with the reference, latency;
6. end with a short Locust load test of every method's tenants against the same server
   (``vllm_plugins/loadtest/demo.toml``) and its HTML report.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vllm_plugins import paths
from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.storage import load_adapter
from vllm_plugins.bench import write_report
from vllm_plugins.demo_model import build_demo_model
from vllm_plugins.loadtest.report import HEADLINE, headline_rows
from vllm_plugins.loadtest.runner import DEMO_CONFIG, run_loadtest
from vllm_plugins.serving.process import request_json, running_server
from vllm_plugins.tasks import OPS, load_task
from vllm_plugins.tasks.suite import Example, format_example, sample_letters
from vllm_plugins.training.evaluate import MAX_NEW_TOKENS, generate_answers
from vllm_plugins.training.recipes import load_base, train_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tenant:
    name: str
    method: str
    task: str


TENANTS = (
    Tenant("acme", "iapt", "upper"),
    Tenant("wayne", "iapt", "count"),
    Tenant("globex", "para", "reverse"),
    Tenant("tyrell", "para", "ends"),
    Tenant("initech", "milora", "swap"),
    Tenant("soylent", "milora", "mirror"),
    Tenant("umbrella", "lora", "shift"),
    Tenant("hooli", "fanlora", "rotate"),
    Tenant("stark", "alora", "double"),
)
BASE_NAME = "demo-base"  # the server's --served-model-name
SERVED_PER_TENANT = 50
BASE_PROMPTS = 50
CLIENTS = 32


@dataclass(frozen=True)
class Request:
    model: str  # a tenant's adapter name, or BASE_NAME
    example: Example
    reference: str  # the transformers answer of the same model


@dataclass(frozen=True)
class Served:
    request: Request
    answer: str
    seconds: float


def _base_examples() -> list[Example]:
    rng = random.Random(7)
    return [format_example(sample_letters(rng), rng.choice(list(OPS.values())), instructed=True) for _ in range(BASE_PROMPTS)]


def _exact(answers: list[str], examples: list[Example]) -> float:
    return sum(a == e.answer.strip() for a, e in zip(answers, examples)) / len(examples)


def _train_and_score(model_path: Path, adapter_dir: Path) -> tuple[list[dict], list[Request]]:
    """Train (or reuse) each tenant's adapter, copy it into ``adapter_dir`` under the
    tenant's name, and score it in transformers; returns the rows and the requests to serve."""
    base, tokenizer = load_base(model_path)
    rows, requests = [], []
    for tenant in TENANTS:
        trained = train_method(tenant.method, tenant.task, model_path)
        shutil.copytree(trained.path, adapter_dir / tenant.name)
        test = load_task(tenant.task).test
        prompts = [e.prompt for e in test]
        lm, manifest = load_adapter(trained.path, load_base(model_path)[0])  # adapters wrap their own copy
        answers = generate_answers(lm, tokenizer, prompts)
        rows.append(
            {
                "tenant": tenant.name,
                "method": tenant.method,
                "task": tenant.task,
                "base_exact_match": _exact(generate_answers(PlainLM(base), tokenizer, prompts), test),
                "reference_exact_match": _exact(answers, test),
                "trainable_parameters": manifest["metrics"]["trainable_parameters"],
            }
        )
        requests += [Request(tenant.name, e, a) for e, a in zip(test[:SERVED_PER_TENANT], answers)]
    examples = _base_examples()
    answers = generate_answers(PlainLM(base), tokenizer, [e.prompt for e in examples])
    requests += [Request(BASE_NAME, e, a) for e, a in zip(examples, answers)]
    return rows, requests


def _send(url: str, request: Request) -> Served:
    started = time.monotonic()
    body = {"model": request.model, "prompt": request.example.prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    status, reply = request_json(f"{url}/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"{request.model}: HTTP {status}: {reply}")
    return Served(request, reply["choices"][0]["text"].strip(), time.monotonic() - started)


def _serve_traffic(model_path: Path, adapter_dir: Path, requests: list[Request], out: Path) -> dict:
    log_file = out / "server.log"
    args = ("--served-model-name", BASE_NAME, "--dtype", "float32", "--max-model-len", "2048")
    logger.info(f"starting vllm-plugins serve with {len(TENANTS)} tenants' adapters (log: {log_file})")
    with running_server(model_path, adapter_dir, log_file, *args) as url:
        _, models = request_json(f"{url}/v1/models")
        traffic = random.Random(0).sample(requests, len(requests))
        logger.info(f"sending {len(traffic)} requests from {CLIENTS} concurrent clients")
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            served = list(pool.map(lambda r: _send(url, r), traffic))
        seconds = time.monotonic() - started
        logger.info(f"load test: {DEMO_CONFIG.name}")
        page = run_loadtest(DEMO_CONFIG, url, out / "loadtest", title="vllm-plugins demo: load test of every method")
    return {
        "loadtest": {"report": str(page), "summary": json.loads((page.parent / "summary.json").read_text())},
        "url": url,
        "models": [{"id": m["id"], "method": m.get("method", "stock LoRA" if m.get("parent") else "base")} for m in models["data"]],
        "seconds": round(seconds, 1),
        "served": served,
    }


def _per_model(served: list[Served], model: str) -> dict:
    mine = [s for s in served if s.request.model == model]
    return {
        "served": len(mine),
        "served_exact_match": sum(s.answer == s.request.example.answer.strip() for s in mine) / len(mine),
        "served_equals_reference": sum(s.answer == s.request.reference for s in mine),
        "mean_latency_ms": round(1e3 * statistics.fmean(s.seconds for s in mine), 1),
        "example": {"prompt": mine[0].request.example.prompt, "answer": mine[0].answer},
    }


def run_demo(preset: str = "demo") -> Path:
    started = time.monotonic()
    model_path = build_demo_model(preset)
    out = paths.reports_dir() / "demo"
    adapter_dir = out / "adapters"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter_dir.mkdir(parents=True)
    rows, requests = _train_and_score(model_path, adapter_dir)
    traffic = _serve_traffic(model_path, adapter_dir, requests, out)
    for row in rows:
        row.update(_per_model(traffic["served"], row["tenant"]))
    report = {
        "model": str(model_path),
        "server": {"models": traffic["models"], "requests": len(requests), "clients": CLIENTS, "seconds": traffic["seconds"]},
        "base": _per_model(traffic["served"], BASE_NAME),
        "tenants": rows,
        "loadtest": traffic["loadtest"],
        "seconds": round(time.monotonic() - started, 1),
    }
    write_report(report, out / "report.json")
    (out / "report.md").write_text(format_report(report))
    print(format_report(report))
    print(f"report: {out / 'report.md'}")
    print(f"load-test report: {report['loadtest']['report']}")
    return out / "report.md"


def format_report(report: dict) -> str:
    server, base = report["server"], report["base"]
    lines = [
        "# vllm-plugins demo",
        "",
        f"Base model: `{report['model']}`. One `vllm-plugins serve` answered {server['requests']} requests "
        f"from {server['clients']} concurrent clients in {server['seconds']}s: every tenant's held-out "
        f"prompts and plain base-model prompts, mixed in the same batches.",
        "",
        "Served models: " + ", ".join(f"`{m['id']}` ({m['method']})" for m in server["models"]),
        "",
        "EM = exact match. Reference = the same adapter in transformers, greedy, on the task's 200 test "
        "prompts (base EM: the base model without the adapter). Served = through the server, on the "
        f"first {SERVED_PER_TENANT} of them; \"= ref\" counts served answers identical to the reference's.",
        "",
        "| tenant | method | task | params | base EM | reference EM | served EM | = ref | latency | example |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report["tenants"]:
        ex = t["example"]
        lines.append(
            f"| {t['tenant']} | {t['method']} | {t['task']} | {t['trainable_parameters']} | "
            f"{t['base_exact_match']:.2f} | {t['reference_exact_match']:.2f} | {t['served_exact_match']:.2f} | "
            f"{t['served_equals_reference']}/{t['served']} | {t['mean_latency_ms']:.0f} ms | "
            f"`{ex['prompt']}` -> `{ex['answer']}` |"
        )
    lines += [
        "",
        f"Base model (`{BASE_NAME}`, instructed prompts): served EM {base['served_exact_match']:.2f}, "
        f"{base['served_equals_reference']}/{base['served']} identical to transformers, "
        f"mean latency {base['mean_latency_ms']:.0f} ms.",
        "",
        "## Load test",
        "",
        f"Locust, {report['loadtest']['summary']['requests']} streamed requests from every method's tenants "
        f"against the same server (`vllm_plugins/loadtest/demo.toml`); TPOT is the mean inter-token latency.",
        "",
        "| " + " | ".join(HEADLINE) + " |",
        "|" + "---|" * len(HEADLINE),
        *("| " + " | ".join(row) + " |" for row in headline_rows(report["loadtest"]["summary"])),
        "",
        f"Load-test report: {report['loadtest']['report']}",
        "",
        f"Total time: {report['seconds']}s",
    ]
    return "\n".join(lines) + "\n"
