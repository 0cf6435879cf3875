"""``vllm-plugins bench eviction --reference kvpress``: NVIDIA kvpress's presses on the
bench's own prompts and kept-token counts, scored by the bench's own scorer.

Our side (this module, in our venv) writes a job: the demo model's directory, every
prompt's token ids (tokenized by the model's tokenizer, as vLLM does), and for each keep
ratio and press the number of tokens the press's served counterpart keeps of each prompt
(:data:`SERVED_POLICY`, :func:`kept_tokens`). The standalone script
``standalone/kvpress_presses.py`` runs it in kvpress's venv (:mod:`.reference_venv`) and
answers greedily under each press; this module scores those answers and lays them beside
the served policies' rows.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from importlib.resources import files
from pathlib import Path

from vllm_plugins.bench.eviction import EvictionBench, answer_tokens, bench_examples, score_answers
from vllm_plugins.bench.reference_venv import KVPRESS_VERSION, ReferenceVenv, ensure_venv, isolated_env, kvpress_venv
from vllm_plugins.eviction.budget import plan_eviction
from vllm_plugins.eviction.policies import POLICIES
from vllm_plugins.eviction.settings import EvictionRule

logger = logging.getLogger(__name__)

NO_PRESS = "none"  # the full cache
PRESSES = (NO_PRESS, "ExpectedAttentionPress", "SnapKVPress", "ObservedAttentionPress", "StreamingLLMPress", "RandomPress")
SCRIPT = "standalone/kvpress_presses.py"
# Each press keeps what its served counterpart keeps; ObservedAttentionPress (H2O's scores)
# has none and keeps the rule's own budget.
SERVED_POLICY = {"ExpectedAttentionPress": "expected_attention", "SnapKVPress": "snapkv",
                 "StreamingLLMPress": "streaming_llm", "RandomPress": "random"}


def script_path() -> Path:
    """The standalone script, shipped as package data of ``vllm_plugins.bench``."""
    return Path(str(files("vllm_plugins.bench") / SCRIPT))


def kept_tokens(num_prompt: int, keep_ratio: float, block_size: int, policy: str | None = None) -> int:
    """Tokens of a ``num_prompt``-token prompt that served ``policy`` keeps at
    ``keep_ratio``, as the scheduler plans it: the rule's budget, raised to the policy's
    smallest (its protected tokens, e.g. SnapKV's 64-token window) and rounded up to whole
    evicted blocks; ``num_prompt`` when no block would be freed. ``policy=None``: the
    rule's own budget, the fewest any served policy keeps."""
    counts = []
    for name in [policy] if policy else sorted(POLICIES):
        plan = plan_eviction(name, num_prompt, EvictionRule(name, keep_ratio).tokens_to_keep(num_prompt), block_size, 0)
        counts.append(num_prompt if plan is None else plan.num_kept)
    return min(counts)


def make_job(model: Path, prompts: list[list[int]], bench: EvictionBench, max_new_tokens: int,
             presses: tuple[str, ...] = PRESSES, torch_threads: int = 1) -> dict:
    """The job for the standalone script (its docstring gives the format): ``prompts`` are
    token ids, <bos> included, of ``bench.task``'s examples; per keep ratio of ``bench``
    and press, one kept count per prompt (:data:`SERVED_POLICY`)."""
    budgets = [{"keep_ratio": ratio, "kept_tokens": {
        press: [kept_tokens(len(p), ratio, bench.block_size, SERVED_POLICY.get(press)) for p in prompts]
        for press in presses if press != NO_PRESS}} for ratio in bench.ratios]
    return {"model": str(model), "task": bench.task, "kvpress_version": KVPRESS_VERSION, "max_new_tokens": max_new_tokens,
            "seed": bench.seed, "torch_threads": torch_threads, "presses": list(presses), "prompts": prompts, "budgets": budgets}


def run_job(job: dict, python: Path, workdir: Path) -> dict:
    """Runs the standalone script on ``job`` with ``python`` (kvpress's venv); its result.
    Raises subprocess.CalledProcessError when the script fails (its stderr is shown)."""
    job_file, result_file = workdir / "kvpress-job.json", workdir / "kvpress-result.json"
    job_file.write_text(json.dumps(job))
    subprocess.run([str(python), str(script_path()), str(job_file), str(result_file)], check=True, env=isolated_env())
    return json.loads(result_file.read_text())


def score_runs(result: dict, job: dict, expected: list[str]) -> list[dict]:
    """One row per run of ``result``: press, keep ratio, the tokens kept (the distinct
    counts over prompts) and the bench's fact and answer accuracy against ``expected``.
    ValueError when a run kept other counts than the job asked, or answered another
    number of prompts."""
    asked = {(press, budget["keep_ratio"]): counts for budget in job["budgets"] for press, counts in budget["kept_tokens"].items()}
    asked[NO_PRESS, None] = [len(p) for p in job["prompts"]]
    rows = []
    for run in result["runs"]:
        if len(run["answers"]) != len(expected):
            raise ValueError(f"{run['press']} at {run['keep_ratio']} answered {len(run['answers'])} prompts, not {len(expected)}")
        if run["kept_tokens"] != asked.get((run["press"], run["keep_ratio"])):
            raise ValueError(f"{run['press']} at {run['keep_ratio']} kept other token counts than the job asked")
        facts, whole = score_answers(run["answers"], expected)
        rows.append({"press": run["press"], "keep_ratio": run["keep_ratio"], "kept_tokens": sorted(set(run["kept_tokens"])),
                     "fact_accuracy": round(facts, 4), "answer_accuracy": round(whole, 4)})
    return rows


def run_kvpress_reference(bench: EvictionBench, model: Path, spec: ReferenceVenv | None = None) -> dict:
    """The ``reference`` section of the bench's report: kvpress's presses on the bench's
    prompts, those of ``bench.task`` (creating kvpress's venv on first use)."""
    from transformers import AutoTokenizer

    spec = spec or kvpress_venv()
    python = ensure_venv(spec)
    examples = bench_examples(bench)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer(e.prompt).input_ids for e in examples]
    job = make_job(model, prompts, bench, answer_tokens(examples[0]))
    logger.info(f"kvpress {KVPRESS_VERSION}: {len(job['presses'])} presses on {len(prompts)} prompts in {spec.path}")
    with tempfile.TemporaryDirectory(prefix="kvpress-") as workdir:
        result = run_job(job, python, Path(workdir))
    rows = score_runs(result, job, [e.answer for e in examples])
    for row in rows:
        logger.info(f"kvpress {row['press']} {row['keep_ratio']}: facts {row['fact_accuracy']}, answers {row['answer_accuracy']}")
    return {
        "library": "kvpress", "task": job["task"], "version": result["kvpress_version"],
        "transformers_version": result["transformers_version"], "torch_version": result["torch_version"], "venv": str(spec.path), "seconds": result["seconds"],
        "max_new_tokens": job["max_new_tokens"],
        "kept_tokens": {str(b["keep_ratio"]): {press: sorted(set(counts)) for press, counts in b["kept_tokens"].items()}
                        for b in job["budgets"]},
        "results": rows,
    }


def _cell(row: dict) -> str:
    return f"{row['fact_accuracy']:.3f} ({row['answer_accuracy']:.3f})"


def _kept_summary(kept: dict[str, list[int]]) -> str:
    """``kept`` (press -> distinct counts) as "87 SnapKVPress, 55 the others", or "107"
    when every press keeps the same."""
    by_count: dict[str, list[str]] = {}
    for press, counts in kept.items():
        by_count.setdefault("/".join(map(str, counts)), []).append(press)
    if len(by_count) == 1:
        return next(iter(by_count))
    *fewer, most_common = sorted(by_count.items(), key=lambda item: len(item[1]))
    return ", ".join([f"{count} {'/'.join(presses)}" for count, presses in fewer] + [f"{most_common[0]} the others"])


def format_reference(report: dict) -> str:
    """Facts right (answers right) per keep ratio: the served policies' rows from
    ``report["results"]`` (when the engine part ran) above kvpress's presses."""
    reference = report["reference"]
    ratios = [float(r) for r in reference["kept_tokens"]]
    kept = "; ".join(f"{r:g}: {_kept_summary(reference['kept_tokens'][str(r)])}" for r in ratios)
    width = 16
    lines = [
        f"Beside kvpress {reference['version']} (transformers {reference['transformers_version']}): share of answer "
        f"facts right (answers entirely right), same {reference['task']} prompts, each press keeping what its "
        f"served policy keeps ({kept})",
        f"{'':<9}{'policy / press':<24}{'full cache':>{width}}" + "".join(f"{f'keep {r:g}':>{width}}" for r in ratios),
    ]
    sources = [("served", report.get("results", []), "policy"), ("kvpress", reference["results"], "press")]
    for source, rows, name_key in sources:
        by_name: dict[str, dict] = {}
        for row in rows:
            by_name.setdefault(row[name_key], {})[row["keep_ratio"]] = row
        for name, cells in by_name.items():
            text = [_cell(cells[None]) if None in cells else "-"] + [_cell(cells[r]) if r in cells else "-" for r in ratios]
            lines.append(f"{source:<9}{name:<24}" + "".join(f"{t:>{width}}" for t in text))
    return "\n".join(lines)
