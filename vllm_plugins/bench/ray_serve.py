"""``vllm-plugins bench ray-serve``: what Ray Serve adds to TTFT and TPOT.

The same Locust load test (``vllm-plugins loadtest``), in one run, first against a plain
``vllm-plugins serve`` and then through Ray Serve with one replica running the same
server with the same flags, on a local single-node Ray. With one replica on each side, the
difference is what the router and Serve's proxy add, not a second server's capacity.
Every model is sent one request on each side before the timed run, so that adapter loads
stay out of the figures.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from vllm_plugins.loadtest.runner import run_loadtest
from vllm_plugins.loadtest.spec import load_spec
from vllm_plugins.serving.process import free_port, request_json, running_server

FIGURES = ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")


def _warm(url: str, models: list[str], api_key: str | None) -> None:
    for model in models:
        body = {"model": model, "prompt": "a b c", "max_tokens": 2}
        status, body = request_json(f"{url}/v1/completions", body, api_key=api_key)
        if status != 200:
            raise RuntimeError(f"{model}: HTTP {status}: {body}")


def _measure(config: Path, url: str, models: list[str], out: Path, api_key: str | None) -> dict:
    _warm(url, models, api_key)
    run_loadtest(config, url, out, api_key=api_key)
    summary = json.loads((out / "summary.json").read_text())
    return {"requests": summary["requests"], "failed": summary["failed"],
            "by_method": {m: {k: s[k] for k in FIGURES} for m, s in summary["by_method"].items()}}


def run_ray_serve_bench(config: Path, model: Path, adapter_dir: Path, serve_args: list[str], out: Path) -> dict:
    import ray
    from ray import serve

    from vllm_plugins.deploy.ray_serve import RayServeConfig, api_key_of, build_app

    api_key = api_key_of(serve_args)  # both servers get the same flags
    models = sorted({t.model for t in load_spec(config).tenants})
    report: dict = {"config": str(config)}
    with running_server(model, adapter_dir, out / "plain-server.log", *serve_args) as url:
        report["plain"] = _measure(config, url, models, out / "plain", api_key)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=tempfile.mkdtemp(prefix="ray-"))
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(RayServeConfig(model=str(model), adapter_dir=str(adapter_dir), serve_args=serve_args, num_replicas=1))
        serve.run(app, name="vllm-plugins", route_prefix="/")
        report["ray_serve"] = _measure(config, f"http://127.0.0.1:{port}", models, out / "ray-serve", api_key)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["overhead"] = {
        m: {k: report["ray_serve"]["by_method"][m][k] - plain[k] for k in FIGURES}
        for m, plain in report["plain"]["by_method"].items()
    }
    return report


def format_report(report: dict) -> str:
    lines = [
        "| method | TTFT p50 plain / Ray Serve (ms) | TTFT p99 | TPOT p50 | TPOT p99 |",
        "|---|---|---|---|---|",
    ]
    for m, plain in report["plain"]["by_method"].items():
        ray_ = report["ray_serve"]["by_method"][m]
        lines.append(f"| {m} | " + " | ".join(f"{plain[k]:.1f} / {ray_[k]:.1f}" for k in FIGURES) + " |")
    lines.append(f"failed requests: plain {report['plain']['failed']}, Ray Serve {report['ray_serve']['failed']}")
    return "\n".join(lines)
