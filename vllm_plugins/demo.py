"""``vllm-plugins demo``: the main job, end to end on this machine.

1. build (or reuse) the embedded demo base model;
2. load it in vLLM and check its greedy answers against transformers;
3. train (or reuse) one tenant adapter per method, each tenant its own task;
4. score every tenant with and without its adapter on held-out prompts;
5. write a report (JSON and Markdown) and print where it is.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_plugins import paths
from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.storage import load_adapter
from vllm_plugins.demo_model import build_demo_model
from vllm_plugins.progress import log
from vllm_plugins.tasks import OPS, load_task
from vllm_plugins.tasks.suite import format_example, sample_letters
from vllm_plugins.training.evaluate import exact_match, generate_answers
from vllm_plugins.training.recipes import load_base, train_method


@dataclass(frozen=True)
class Tenant:
    name: str
    method: str
    task: str


TENANTS = (
    Tenant("acme", "iapt", "upper"),
    Tenant("globex", "para", "reverse"),
    Tenant("initech", "milora", "swap"),
    Tenant("umbrella", "lora", "shift"),
    Tenant("hooli", "fanlora", "rotate"),
    Tenant("stark", "alora", "double"),
)
VLLM_CHECK_PROMPTS = 32


def _vllm_check(model_path: Path) -> dict:
    """Greedy answers of the base model in vLLM and in transformers, on instructed prompts."""
    from vllm_plugins.serving.offline import greedy_texts, make_engine

    rng = random.Random(7)
    examples = [
        format_example(sample_letters(rng), rng.choice(list(OPS.values())), instructed=True)
        for _ in range(VLLM_CHECK_PROMPTS)
    ]
    prompts = [e.prompt for e in examples]
    log("demo", "starting a vLLM engine on the demo model")
    started = time.monotonic()
    engine = make_engine(model_path)
    vllm_answers = greedy_texts(engine, prompts)
    seconds = time.monotonic() - started
    base, tokenizer = load_base(model_path)
    hf_answers = generate_answers(PlainLM(base), tokenizer, prompts)
    return {
        "prompts": len(prompts),
        "vllm_equals_transformers": sum(a == b for a, b in zip(vllm_answers, hf_answers)),
        "vllm_exact_match": sum(a == e.answer.strip() for a, e in zip(vllm_answers, examples)) / len(examples),
        "vllm_seconds": round(seconds, 1),
        "sample": [{"prompt": p, "vllm": a} for p, a in zip(prompts[:4], vllm_answers[:4])],
    }


def run_demo(preset: str = "demo") -> Path:
    started = time.monotonic()
    model_path = build_demo_model(preset)
    report: dict = {"model": str(model_path), "vllm": _vllm_check(model_path), "tenants": []}
    base, tokenizer = load_base(model_path)
    for tenant in TENANTS:
        trained = train_method(tenant.method, tenant.task, model_path)
        test = load_task(tenant.task).test
        lm, manifest = load_adapter(trained.path, load_base(model_path)[0])  # adapters wrap their own copy
        report["tenants"].append(
            {
                "tenant": tenant.name,
                "method": tenant.method,
                "task": tenant.task,
                "base_exact_match": exact_match(PlainLM(base), tokenizer, test),
                "adapter_exact_match": exact_match(lm, tokenizer, test),
                "trainable_parameters": manifest["metrics"]["trainable_parameters"],
                "adapter": str(trained.path),
                "example": {"prompt": test[0].prompt, "answer": generate_answers(lm, tokenizer, [test[0].prompt])[0]},
            }
        )
    report["seconds"] = round(time.monotonic() - started, 1)
    out = paths.reports_dir() / "demo"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    print(format_report(report))
    print(f"report: {out / 'report.md'}")
    return out / "report.md"


def format_report(report: dict) -> str:
    v = report["vllm"]
    lines = [
        "# vllm-plugins demo",
        "",
        f"Base model: `{report['model']}`",
        "",
        f"vLLM greedy answers equal transformers' on {v['vllm_equals_transformers']}/{v['prompts']} "
        f"instructed prompts (exact match {v['vllm_exact_match']:.2f}).",
        "",
        "| tenant | method | task | base EM | adapter EM | params | example |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report["tenants"]:
        ex = t["example"]
        lines.append(
            f"| {t['tenant']} | {t['method']} | {t['task']} | {t['base_exact_match']:.2f} | "
            f"{t['adapter_exact_match']:.2f} | {t['trainable_parameters']} | `{ex['prompt']}` -> `{ex['answer']}` |"
        )
    lines += ["", f"Total time: {report['seconds']}s"]
    return "\n".join(lines) + "\n"
