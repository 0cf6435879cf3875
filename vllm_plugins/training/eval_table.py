"""``vllm-plugins eval``: every method on several tenant tasks, against the bare base model.

For each task: the base model's held-out exact match; for each method and task: the
adapter's held-out exact match, its tunable parameter count and its training seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.storage import load_adapter
from vllm_plugins.tasks import load_task
from vllm_plugins.training.evaluate import exact_match
from vllm_plugins.training.recipes import load_base, train_method

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("reverse", "shift", "upper", "count")
DEFAULT_METHODS = ("lora", "fanlora", "alora", "iapt", "para", "milora")
PASS_MARK = 0.8


def run_eval(base_path: str | Path, methods=DEFAULT_METHODS, tasks=DEFAULT_TASKS) -> dict:
    base, tokenizer = load_base(base_path)
    report: dict = {"base_model": str(base_path), "base": {}, "results": []}
    for task in tasks:
        report["base"][task] = exact_match(PlainLM(base), tokenizer, load_task(task).test)
        logger.info(f"base model on {task}: exact match {report['base'][task]:.3f}")
    for method in methods:
        for task in tasks:
            trained = train_method(method, task, base_path)
            lm, manifest = load_adapter(trained.path, load_base(base_path)[0])
            score = exact_match(lm, tokenizer, load_task(task).test)
            metrics = manifest["metrics"]
            report["results"].append(
                {
                    "method": method,
                    "task": task,
                    "exact_match": score,
                    "trainable_parameters": metrics["trainable_parameters"],
                    "train_seconds": metrics["train_seconds"],
                    "adapter": str(trained.path),
                }
            )
            logger.info(f"{method} on {task}: exact match {score:.3f}")
    report["summary"] = {
        method: sum(
            r["exact_match"] >= PASS_MARK and report["base"][r["task"]] <= 0.1
            for r in report["results"]
            if r["method"] == method
        )
        for method in methods
    }
    return report


def format_table(report: dict) -> str:
    tasks = list(report["base"])
    head = f"{'method':<8} {'params':>8} " + " ".join(f"{t:>9}" for t in tasks) + f" {'train s':>8}  >=80%"
    lines = [head, "-" * len(head)]
    lines.append(f"{'base':<8} {0:>8} " + " ".join(f"{report['base'][t]:>9.3f}" for t in tasks))
    methods = dict.fromkeys(r["method"] for r in report["results"])
    for m in methods:
        rows = {r["task"]: r for r in report["results"] if r["method"] == m}
        params = max(r["trainable_parameters"] for r in rows.values())
        seconds = sum(r["train_seconds"] for r in rows.values()) / len(rows)
        lines.append(
            f"{m:<8} {params:>8} " + " ".join(f"{rows[t]['exact_match']:>9.3f}" for t in tasks)
            + f" {seconds:>8.1f}  {report['summary'][m]}/{len(tasks)}"
        )
    return "\n".join(lines)
