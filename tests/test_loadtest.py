"""The multi-tenant load test: its spec and report logic, and a bounded Locust run against
a real server with tenants of every served method."""

from __future__ import annotations

import html
import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import SERVED_ADAPTERS

from vllm_plugins.loadtest.report import read_records, summarize
from vllm_plugins.loadtest.spec import LengthDistribution, LoadTestSpec, Slo, Tenant, load_spec, zipf_weights


def test_zipf_weights_follow_the_law():
    weights = zipf_weights(4, 1.0)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0) and weights[0] / weights[3] == pytest.approx(4.0)


def test_zipf_popularity_of_sampled_tenants():
    rng = random.Random(0)
    counts = Counter(rng.choices(range(3), zipf_weights(3, 1.1), k=20000))
    assert counts[0] > counts[1] > counts[2]
    assert counts[0] / 20000 == pytest.approx(zipf_weights(3, 1.1)[0], abs=0.02)


@pytest.mark.parametrize("kind", ["lognormal", "uniform", "fixed"])
def test_lengths_stay_in_bounds(kind):
    dist = LengthDistribution(kind=kind, median=20, sigma=1.5, low=5, high=40)
    values = [dist.sample(random.Random(i)) for i in range(500)]
    assert min(values) >= 5 and max(values) <= 40
    if kind == "fixed":
        assert set(values) == {20}
    else:
        assert len(set(values)) > 10


TENANT = '[[tenant]]\nname = "a"\nmethod = "para"\nmodel = "a"\n'


def test_bad_specs_are_refused(tmp_path):
    """Every bad key is named with what is wrong, and the file it came from."""
    config = tmp_path / "bad.toml"
    cases = {
        '[slo]\nttft_ms = 1\ntpot_ms = 1\n': "tenants: Field required",
        '[[tenant]]\nname = "a"\nmethod = "prefix-tuning"\nmodel = "a"\n[slo]\nttft_ms = 1\ntpot_ms = 1\n':
            "tenants.0.method: Input should be 'base', 'lora'",
        '[[tenant]]\nname = "a"\nmethod = "para"\nmodel = "a"\n[slo]\nttft_ms = 1\ntpot_ms = 1\n'
        '[prompt_tokens]\nkind = "pareto"\n[load]\nusers = 0\nextra = 1\n':
            "prompt.kind: Input should be 'lognormal', 'uniform' or 'fixed'; users: Input should be greater than or "
            "equal to 1; extra: unknown key",
        '[[tenant]]\nname = "a"\nmethod = "para"\nmodel = "a"\n[slo]\nttft_ms = 1\ntpot_ms = 1\n'
        '[output_tokens]\nlow = 9\nhigh = 3\n': "output: length bounds must satisfy 1 <= low <= high",
        "[slo\n": "not TOML",
        TENANT + '[slo]\nttft_ms = nan\ntpot_ms = -1\n': "slo.ttft_ms: Input should be a finite number; slo.tpot_ms: Input should be greater than 0",
        TENANT + '[slo]\nttft_ms = 1\ntpot_ms = 1\n[load]\nrequest_timeout_s = inf\nspawn_rate = 0\nzipf_exponent = -5\nusers = true\n':
            "zipf_exponent: Input should be greater than or equal to 0; users: Input should be a valid integer; "
            "spawn_rate: Input should be greater than 0; request_timeout_s: Input should be a finite number",
        TENANT + '[slo]\nttft_ms = 1\ntpot_ms = 1\n[method_weights]\nbogus = 1.0\npara = -1\n':
            "method_weights.bogus.[key]: Input should be 'base', 'lora'",
        TENANT + TENANT + '[slo]\nttft_ms = 1\ntpot_ms = 1\n': "tenant names must be distinct, got ['a'] twice",
        TENANT + '[slo]\nttft_ms = 1\ntpot_ms = 1\n[prompt_tokens]\nhigh = 100000000\nmedian = nan\n':
            "prompt.median: Input should be a finite number; prompt.high: Input should be less than or equal to 1000000",
        TENANT + 'words = ["a"]\n[slo]\nttft_ms = 1\ntpot_ms = 1\n': "words: unknown key",
    }
    for text, message in cases.items():
        config.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)) as refused:
            load_spec(config)
        assert str(refused.value).startswith(str(config))
    with pytest.raises(ValueError, match="cannot read load-test config"):
        load_spec(tmp_path / "missing.toml")


def _row(method, tenant, ttft, itl, status=200, start=0.0, tokens=10):
    return {"start_s": start, "method": method, "tenant": tenant, "model": tenant, "status": status, "error": "" if status == 200 else "boom",
            "ttft_ms": ttft if status == 200 else None, "itl_ms": itl if status == 200 else None,
            "e2e_ms": ttft + itl * (tokens - 1) if status == 200 else None, "prompt_tokens": 5, "output_tokens": tokens, "requested_tokens": tokens}


def test_summary_percentiles_goodput_and_ratios():
    spec = LoadTestSpec(tenants=(Tenant(name="b", method="base", model="m"), Tenant(name="t", method="para", model="t")),
                        slo=Slo(ttft_ms=100, tpot_ms=10))
    rows = [_row("base", "b", 50, 5, start=i) for i in range(4)] + [_row("para", "t", 100 + 100 * i, 5, start=i) for i in range(4)]
    rows.append(_row("para", "t", 0, 0, status=500, start=1))
    summary = summarize(rows, spec)
    para = summary["by_method"]["para"]
    assert para["requests"] == 5 and para["failed"] == 1
    assert para["ttft_ms_p50"] == pytest.approx(250.0)
    assert para["ttft_ms_p50_over_base"] == pytest.approx(5.0)
    assert para["slo_attainment"] == pytest.approx(1 / 5)  # only the 100 ms request meets the SLO
    assert summary["by_method"]["base"]["slo_attainment"] == 1.0
    assert summary["failures"] == {"500 boom": 1}
    assert summary["by_tenant"]["t"]["method"] == "para"


def _config(path, tenants, **load) -> Path:
    """A load-test TOML at ``path``: ``tenants`` as (name, method, model), short uniform
    requests, SLOs every answered request meets, ``load`` overriding the [load] table."""
    load = {"users": 6, "spawn_rate": 6, "max_requests": 30, "run_time_s": 120, "request_timeout_s": 60, "seed": 1, **load}
    lines = ["[load]"] + [f"{key} = {value}" for key, value in load.items()] + [
        "[slo]", "ttft_ms = 60000", "tpot_ms = 60000",
        "[prompt_tokens]", 'kind = "uniform"', "low = 8", "high = 24",
        "[output_tokens]", 'kind = "uniform"', "low = 3", "high = 8",
    ]
    for name, method, model in tenants:
        lines += ["[[tenant]]", f'name = "{name}"', f'method = "{method}"', f'model = "{model}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.engine
@pytest.mark.locust
def test_load_test_against_a_real_server(server, tmp_path):
    from vllm_plugins.loadtest.runner import run_loadtest

    # ALoRA's tenants are stock LoRA tenants to the load test, as in the demo's (its classes are by serving path)
    tenants = [("base", "base", "demo")] + [(name, method.replace("alora", "lora"), name)
                                            for name, (method, _) in SERVED_ADAPTERS.items()]
    config = _config(tmp_path / "loadtest.toml", tenants)

    page = run_loadtest(config, server, tmp_path / "run")

    rows = read_records(tmp_path / "run" / "requests.csv")
    assert len(rows) == 30
    assert {r["method"] for r in rows} == {"base", "lora", "fanlora", "iapt", "para", "milora"}
    assert all(r["status"] == 200 and not r["error"] for r in rows), [r["error"] for r in rows if r["error"]]
    for r in rows:
        assert (r["tenant"], r["method"]) in {(n, m) for n, m, _ in tenants}
        assert r["output_tokens"] == r["requested_tokens"]
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["itl_ms"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["by_method"]) == {"base", "lora", "fanlora", "iapt", "para", "milora"}
    assert summary["by_method"]["base"]["ttft_ms_p50_over_base"] == pytest.approx(1.0)
    text = page.read_text()
    assert text.count("<img ") == 5 and "data:image/png;base64," in text
    for method in summary["by_method"]:
        assert f"<td>{method}</td>" in text


class _MisbehavingServer(BaseHTTPRequestHandler):
    """/v1/completions, streamed the way vLLM streams it, or broken the way the request's
    ``model`` names: ``ok``, ``error-event`` (vLLM's mid-stream error event, then [DONE]),
    ``no-usage``, ``short`` (fewer tokens than asked with ignore_eos), ``cut`` (the
    connection closes before usage and [DONE]) or ``http-500``."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes
    authorizations: set[str | None] = set()  # the Authorization headers received

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.authorizations.add(self.headers.get("Authorization"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind, asked = body["model"], body["max_tokens"]
        time.sleep(0.02)  # every kind about as slow, so that every user gets its share of the requests
        if kind == "http-500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "boom", "type": "InternalServerError", "code": 500}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        tokens = asked - 2 if kind == "short" else asked
        for i in range(2 if kind == "error-event" else tokens):
            self._event({"choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]})
        if kind == "error-event":
            self._event({"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}})
        elif kind == "cut":
            return
        elif kind != "no-usage":
            self._event({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, chunk: dict) -> None:
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def misbehaving_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _MisbehavingServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.locust
def test_load_test_counts_broken_streams_as_failures(misbehaving_server, tmp_path, monkeypatch):
    """Every kind of broken answer is a failed request in requests.csv, in Locust's own
    statistics, in the summary (failed, SLO attainment, goodput) and in the HTML report.
    Every request carries the API key of ``$OPENAI_API_KEY``."""
    from vllm_plugins.loadtest.runner import run_loadtest

    monkeypatch.setenv("OPENAI_API_KEY", "load-test-key")

    expected = {  # method: (the server's behaviour, the error recorded)
        "lora": ("error-event", "error event: Internal server error"),
        "fanlora": ("no-usage", "stream ended without its final usage chunk"),
        "iapt": ("short", "fewer completion tokens than asked with ignore_eos"),
        "para": ("cut", "stream ended without [DONE]"),
        "milora": ("http-500", "boom"),
    }
    tenants = [("ok", "base", "ok")] + [(kind, method, kind) for method, (kind, _) in expected.items()]
    config = _config(tmp_path / "loadtest.toml", tenants, spawn_rate=100, max_requests=60, run_time_s=30, request_timeout_s=10)

    page = run_loadtest(config, misbehaving_server, tmp_path / "run")

    rows = read_records(tmp_path / "run" / "requests.csv")
    assert len(rows) == 60
    assert _MisbehavingServer.authorizations == {"Bearer load-test-key"}
    assert {r["method"] for r in rows} == {"base", *expected}
    for r in rows:
        if r["method"] == "base":
            assert r["status"] == 200 and not r["error"] and r["output_tokens"] == r["requested_tokens"]
        else:
            assert expected[r["method"]][1] in r["error"] and r["ttft_ms"] is None, r
            assert r["status"] == (500 if r["method"] == "milora" else 200)
    failed = sum(r["method"] != "base" for r in rows)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"] == failed
    assert summary["by_method"]["base"]["failed"] == 0 and summary["by_method"]["base"]["slo_attainment"] == 1.0
    for method in expected:
        stats = summary["by_method"][method]
        assert stats["failed"] == stats["requests"] > 0
        assert stats["slo_attainment"] == 0.0 and stats["goodput_per_s"] == 0.0
    assert sum(summary["failures"].values()) == failed

    # Locust's own statistics: its final table (its CSVs are written once a second, too rarely for this short run)
    table = re.findall(r"^POST +(\w+) +(\d+) +(\d+)\(", (tmp_path / "run" / "locust.log").read_text(), re.MULTILINE)
    locust = {name: (int(requests), int(fails)) for name, requests, fails in table}
    assert locust["base"][1] == 0
    for method in expected:
        assert locust[method][1] == locust[method][0] > 0

    text = page.read_text()
    assert f"{failed} failed." in text and "No failed requests" not in text
    for _, error in expected.values():  # the failures table
        assert html.escape(error) in text
