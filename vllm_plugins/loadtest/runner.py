"""``vllm-plugins loadtest``: Locust, headless, against one server; then the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vllm_plugins.loadtest.report import write_report
from vllm_plugins.loadtest.spec import LoadTestSpec, load_spec, user_class_name

LOCUSTFILE = Path(__file__).with_name("locustfile.py")  # installed with the package
DEMO_CONFIG = Path(__file__).with_name("demo.toml")  # the demo's load test, and the default --config


def default_words() -> list[str]:
    """Prompt words: the demo model's vocabulary, one token each under its tokenizer."""
    from vllm_plugins.demo_model.corpus import corpus_vocabulary

    return corpus_vocabulary()


def run_locust(spec: LoadTestSpec, host: str, out: Path, api_key: str | None = None) -> Path:
    """Run the users of every method in ``spec`` against ``host``; the per-request CSV.
    ``api_key`` (default: ``$OPENAI_API_KEY``, if set) is sent as a bearer token."""
    if spec.users < len(spec.methods):
        raise ValueError(f"{spec.users} users for {len(spec.methods)} methods: every method's class needs a user")
    out.mkdir(parents=True, exist_ok=True)
    spec_file, records = out / "spec.json", out / "requests.csv"
    spec_file.write_text(spec.model_dump_json())
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--users", str(spec.users), "--spawn-rate", str(spec.spawn_rate), "--run-time", f"{spec.run_time_s}s",
        "--stop-timeout", str(int(spec.request_timeout_s)), "--only-summary", "--exit-code-on-error", "0",
        "--csv", str(out / "locust"), *map(user_class_name, spec.methods),
    ]
    env = {**os.environ, "VLLM_PLUGINS_LOADTEST_SPEC": str(spec_file), "VLLM_PLUGINS_LOADTEST_RECORDS": str(records)}
    if api_key is not None:
        env["OPENAI_API_KEY"] = api_key
    with open(out / "locust.log", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=spec.run_time_s + spec.request_timeout_s + 120)
    if done.returncode != 0:
        raise RuntimeError(f"locust exited with {done.returncode}; see {out / 'locust.log'}")
    return records


def run_loadtest(config: Path, host: str, out: Path, title: str | None = None, api_key: str | None = None) -> Path:
    """The load test of ``config`` against ``host``: ``out/requests.csv`` (one row per
    request), ``out/report.html`` and ``out/summary.json``; returns the HTML report's path.
    ``api_key``: the server's ``--api-key`` (default: ``$OPENAI_API_KEY``, if set)."""
    spec = load_spec(config)
    if not spec.words:
        spec = spec.with_words(default_words())
    records = run_locust(spec, host, out, api_key)
    return write_report(records, spec, out, title or f"Load test of {host}")
