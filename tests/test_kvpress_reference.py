"""`bench eviction --reference kvpress`, our side: the job written for kvpress's venv, the
scoring of its answers, the venv's bookkeeping. Neither kvpress nor an engine runs here
(the real run is a command, not part of CI)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess

import pytest

from vllm_plugins.bench import reference_venv
from vllm_plugins.bench.eviction import PRESETS, answer_tokens, bench_examples, with_task
from vllm_plugins.bench.kvpress_reference import (
    NO_PRESS, PRESSES, SERVED_POLICY, format_reference, kept_tokens, make_job, score_runs, script_path,
)
from vllm_plugins.cli import build_parser
from vllm_plugins.eviction.budget import min_budget, plan_eviction
from vllm_plugins.eviction.policies import POLICIES
from vllm_plugins.eviction.settings import EvictionRule

DEFAULT = PRESETS["default"]


def _script():
    spec = importlib.util.spec_from_file_location("kvpress_presses", script_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # kvpress itself is imported only when a press is made
    return module


def test_kept_tokens_are_what_the_served_policy_keeps():
    """A policy's count is the scheduler's plan for it; without a policy, the fewest any
    keeps. All keep the same unless the ratio's budget falls below a policy's smallest
    (SnapKV's 64-token window: at keep 0.1 of the crowded task's 503 tokens it keeps 87, the
    others 55)."""
    assert [kept_tokens(1003, r, DEFAULT.block_size) for r in DEFAULT.ratios] == [107, 203, 523]
    assert kept_tokens(503, 0.1, DEFAULT.block_size, "snapkv") == 87 and kept_tokens(503, 0.1, DEFAULT.block_size) == 55
    for n in (300, 503, 1003, 2048):
        for ratio in (0.05, 0.1, 0.2, 0.5, 0.9, 1.0):
            kept = {}
            for policy in POLICIES:
                plan = plan_eviction(policy, n, EvictionRule(policy, ratio).tokens_to_keep(n), DEFAULT.block_size, 0)
                kept[policy] = n if plan is None else plan.num_kept
                assert kept_tokens(n, ratio, DEFAULT.block_size, policy) == kept[policy]
            assert kept_tokens(n, ratio, DEFAULT.block_size) == min(kept.values())
            if all(EvictionRule(policy, ratio).tokens_to_keep(n) >= min_budget(policy, n) for policy in POLICIES):
                assert len(set(kept.values())) == 1, (n, ratio, kept)


def test_the_job_holds_the_bench_prompts_and_our_kept_counts(tmp_path):
    bench = PRESETS["tiny"]
    examples = bench_examples(bench)
    prompts = [[1] + [7] * (bench.prompt_words + 2) for _ in examples]  # token ids, <bos> included
    job = json.loads(json.dumps(make_job(tmp_path, prompts, bench, answer_tokens(examples[0]))))  # as written
    assert job["model"] == str(tmp_path) and job["prompts"] == prompts and job["presses"] == list(PRESSES)
    assert job["max_new_tokens"] == 4 and job["kvpress_version"] == "0.5.5" and job["task"] == "retrieval"
    assert [b["keep_ratio"] for b in job["budgets"]] == list(bench.ratios)
    assert set(SERVED_POLICY) == set(PRESSES) - {NO_PRESS, "ObservedAttentionPress"} and set(SERVED_POLICY.values()) <= set(POLICIES)
    for budget in job["budgets"]:
        assert set(budget["kept_tokens"]) == set(PRESSES) - {NO_PRESS}
        for press, counts in budget["kept_tokens"].items():
            policy = SERVED_POLICY.get(press)
            assert counts == [kept_tokens(len(p), budget["keep_ratio"], bench.block_size, policy) for p in prompts], press
    assert bench_examples(bench)[0].prompt == examples[0].prompt  # the same prompts on both sides


def test_the_job_carries_the_task(tmp_path):
    bench = with_task(PRESETS["default"], "crowded-retrieval")
    prompts = [[1] + [7] * (bench.prompt_words + 2)]
    assert make_job(tmp_path, prompts, bench, 4)["task"] == "crowded-retrieval"


def test_compression_ratio_keeps_exactly_the_count_asked():
    compression_ratio = _script().compression_ratio
    for n in range(1, 1200, 7):
        for kept in {1, n // 10, n // 5, n // 2, n - 1, n} - {0}:
            ratio = compression_ratio(n, kept)
            assert 0 <= ratio < 1 and int(n * (1 - ratio)) == kept, (n, kept, ratio)
    with pytest.raises(ValueError):
        compression_ratio(10, 0)
    with pytest.raises(ValueError):
        compression_ratio(10, 11)


def test_the_script_imports_nothing_of_ours():
    tree = ast.parse(script_path().read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "vllm_plugins" for name in names), names


def _job_and_result(answers_by_run: dict) -> tuple[dict, dict]:
    prompts = [[1] * 50, [1] * 50]
    job = {"prompts": prompts, "budgets": [{"keep_ratio": 0.2, "kept_tokens": {"SnapKVPress": [10, 10]}}]}
    runs = [{"press": press, "keep_ratio": ratio, "kept_tokens": [50, 50] if ratio is None else [10, 10], "answers": answers}
            for (press, ratio), answers in answers_by_run.items()]
    return job, {"runs": runs}


def test_reference_answers_are_scored_by_the_bench_scorer():
    expected = [" k1.0:v1 k1.1:v2 k1.2:v3 k1.3:v4", " k2.0:v0 k2.1:v0 k2.2:v0 k2.3:v0"]
    job, result = _job_and_result({
        (NO_PRESS, None): ["k1.0:v1 k1.1:v2 k1.2:v3 k1.3:v4", "k2.0:v0 k2.1:v0 k2.2:v0 k2.3:v0"],
        ("SnapKVPress", 0.2): ["k1.0:v1 k1.1:v2 k1.2:v7 k1.3:v4", "k2.0:v0 k2.1:v5"],
    })
    rows = score_runs(result, job, expected)
    assert rows == [
        {"press": NO_PRESS, "keep_ratio": None, "kept_tokens": [50], "fact_accuracy": 1.0, "answer_accuracy": 1.0},
        {"press": "SnapKVPress", "keep_ratio": 0.2, "kept_tokens": [10], "fact_accuracy": 0.5, "answer_accuracy": 0.0},
    ]
    result["runs"][1]["kept_tokens"] = [10, 11]
    with pytest.raises(ValueError, match="kept other token counts"):
        score_runs(result, job, expected)
    result["runs"][1]["answers"].pop()
    with pytest.raises(ValueError, match="answered 1 prompts"):
        score_runs(result, job, expected)


def test_the_header_says_which_press_kept_more():
    report = {"reference": {"task": "crowded-retrieval", "version": "0.5.5", "transformers_version": "5.2.0", "results": [],
                            "kept_tokens": {"0.1": {"SnapKVPress": [87], "RandomPress": [55], "StreamingLLMPress": [55]},
                                            "0.2": {"SnapKVPress": [119], "RandomPress": [119], "StreamingLLMPress": [119]}}}}
    assert "(0.1: 87 SnapKVPress, 55 the others; 0.2: 119)" in format_reference(report).splitlines()[0]


def test_the_table_lays_presses_beside_the_served_policies():
    report = {
        "results": [{"policy": "off", "keep_ratio": None, "fact_accuracy": 0.998, "answer_accuracy": 0.99},
                    {"policy": "snapkv", "keep_ratio": 0.1, "fact_accuracy": 0.52, "answer_accuracy": 0.1}],
        "reference": {"task": "retrieval", "version": "0.5.5", "transformers_version": "5.2.0",
                      "kept_tokens": {"0.1": {"SnapKVPress": [107], "RandomPress": [107]}},
                      "results": [{"press": NO_PRESS, "keep_ratio": None, "fact_accuracy": 1.0, "answer_accuracy": 1.0},
                                  {"press": "SnapKVPress", "keep_ratio": 0.1, "fact_accuracy": 0.542, "answer_accuracy": 0.2}]},
    }
    lines = format_reference(report).splitlines()
    assert "0.1: 107" in lines[0] and "same retrieval prompts" in lines[0] and "keep 0.1" in lines[1]
    served = next(line for line in lines if line.startswith("served") and "snapkv" in line)
    assert served.split()[-2:] == ["0.520", "(0.100)"] and "-" in served
    pressed = next(line for line in lines if "SnapKVPress" in line)
    assert pressed.startswith("kvpress") and pressed.split()[-2:] == ["0.542", "(0.200)"]
    assert next(line for line in lines if "off" in line).split()[2:4] == ["0.998", "(0.990)"]


def test_the_cli_takes_the_reference():
    args = build_parser().parse_args(["bench", "eviction", "--json", "x.json", "--reference", "kvpress"])
    assert args.reference == "kvpress"
    assert build_parser().parse_args(["bench", "eviction", "--json", "x.json"]).reference is None


def test_the_venv_pins_our_torch_and_lives_under_the_home(plugins_home):
    spec = reference_venv.kvpress_venv("2.13.0+cpu")
    assert spec.requirements == ("torch==2.13.0+cpu", "kvpress==0.5.5")
    assert spec.path == plugins_home / "venvs" / "kvpress-0.5.5"
    assert reference_venv.kvpress_venv().requirements[0].startswith("torch==")  # ours, read from the installed one


class _FakeBuilder:
    def __init__(self, **kwargs):
        assert kwargs == {"with_pip": True, "clear": True}

    def create(self, path):
        (path / "bin").mkdir(parents=True, exist_ok=True)
        (path / "bin" / "python").write_text("")


def test_the_venv_is_created_once_and_a_failed_install_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS_HOME", str(tmp_path))
    monkeypatch.setattr(reference_venv.venv, "EnvBuilder", _FakeBuilder)
    calls = []

    def pip(argv, stdout, stderr, env, returncode=1):
        calls.append(argv)
        stdout.write("pip says no\n")
        assert "PYTHONPATH" not in env
        return subprocess.CompletedProcess(argv, returncode)

    spec = reference_venv.ReferenceVenv("kvpress-test", ("torch==2.13.0+cpu", "kvpress==0.5.5"))
    monkeypatch.setattr(reference_venv.subprocess, "run", pip)
    with pytest.raises(RuntimeError, match="pip says no"):
        reference_venv.ensure_venv(spec)
    assert not spec.is_installed()
    monkeypatch.setattr(reference_venv.subprocess, "run", lambda *a, **k: pip(*a, **k, returncode=0))
    assert reference_venv.ensure_venv(spec) == spec.python and spec.is_installed()
    assert calls[-1][1:] == ["-m", "pip", "install", "--progress-bar", "off", "torch==2.13.0+cpu", "kvpress==0.5.5"]
    reference_venv.ensure_venv(spec)
    assert len(calls) == 2  # installed: not again
    assert not reference_venv.ReferenceVenv("kvpress-test", ("kvpress==0.6",)).is_installed()  # other pins: rebuilt
