"""The load test's report: percentiles per method and per tenant, throughput over time,
failures and goodput against the SLOs, as JSON and as one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import Counter
from pathlib import Path

import jinja2
import numpy as np

from vllm_plugins.loadtest.spec import METHODS, LoadTestSpec

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("vllm_plugins.loadtest"), autoescape=True)

QUANTILES = (50, 90, 99)
METRICS = {"ttft_ms": "TTFT", "itl_ms": "inter-token latency", "e2e_ms": "end-to-end latency"}
NUMERIC = ("start_s", "ttft_ms", "itl_ms", "e2e_ms", "prompt_tokens", "output_tokens", "requested_tokens")


def read_records(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["status"] = int(row["status"])
        for key in NUMERIC:
            row[key] = float(row[key]) if row[key] not in ("", None) else None
    return rows


def succeeded(row: dict) -> bool:
    """A request answered in full: HTTP 200, a first token and no ``error``, which the
    locustfile records for an ``error`` event, a stream cut before its final usage chunk or
    ``[DONE]``, fewer tokens than asked with ``ignore_eos``, or a timeout. Any other request
    is failed: counted in ``failed``, never within the SLOs (goodput, attainment), and
    listed in the report's failures."""
    return row["status"] == 200 and not row["error"] and row["ttft_ms"] is not None


def meets_slo(row: dict, spec: LoadTestSpec) -> bool:
    itl = row["itl_ms"] if row["itl_ms"] is not None else 0.0
    return succeeded(row) and row["ttft_ms"] <= spec.slo.ttft_ms and itl <= spec.slo.tpot_ms


def _group(rows: list[dict], spec: LoadTestSpec, seconds: float) -> dict:
    ok = [r for r in rows if succeeded(r)]
    stats: dict = {"requests": len(rows), "failed": len(rows) - len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if r[key] is not None]
        for q in QUANTILES:
            stats[f"{key}_p{q}"] = float(np.percentile(values, q)) if values else None
    stats["output_tokens_per_s"] = sum(r["output_tokens"] for r in ok) / seconds
    good = sum(meets_slo(r, spec) for r in rows)
    stats["goodput_per_s"] = good / seconds
    stats["slo_attainment"] = good / len(rows) if rows else None
    return stats


def summarize(rows: list[dict], spec: LoadTestSpec) -> dict:
    """Figures per method and per tenant over the run's wall time."""
    if not rows:
        raise ValueError("the load test recorded no requests")
    begin = min(r["start_s"] for r in rows)
    end = max(r["start_s"] + (r["e2e_ms"] or 0.0) / 1e3 for r in rows)
    seconds = max(end - begin, 1e-9)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    by_method = {m: _group([r for r in rows if r["method"] == m], spec, seconds) for m in methods}
    base = by_method.get("base")
    for stats in by_method.values():
        for key in ("ttft_ms", "itl_ms"):
            for q in (50, 99):
                ours, theirs = stats[f"{key}_p{q}"], base and base[f"{key}_p{q}"]
                stats[f"{key}_p{q}_over_base"] = ours / theirs if ours is not None and theirs else None
    tenants = sorted({(r["method"], r["tenant"]) for r in rows}, key=lambda mt: (METHODS.index(mt[0]), mt[1]))
    by_tenant = {t: {"method": m, **_group([r for r in rows if r["tenant"] == t], spec, seconds)} for m, t in tenants}
    failures = Counter(f"{r['status']} {r['error'][:80]}".strip() for r in rows if not succeeded(r))
    return {
        "seconds": seconds, "requests": len(rows), "failed": sum(not succeeded(r) for r in rows),
        "slo": {"ttft_ms": spec.slo.ttft_ms, "tpot_ms": spec.slo.tpot_ms},
        "by_method": by_method, "by_tenant": by_tenant, "failures": dict(failures.most_common()),
    }


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(rows: list[dict], summary: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plots = {}
    methods = list(summary["by_method"])
    for key, label in METRICS.items():
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / len(QUANTILES)
        for i, q in enumerate(QUANTILES):
            values = [summary["by_method"][m][f"{key}_p{q}"] or 0.0 for m in methods]
            ax.bar([x + i * width for x in range(len(methods))], values, width, label=f"p{q}")
        ax.set_xticks([x + width for x in range(len(methods))], methods)
        ax.set_ylabel("ms")
        ax.set_title(f"{label} per method")
        ax.legend()
        plots[f"{label} per method"] = _figure_png(fig)
        plt.close(fig)

    begin = min(r["start_s"] for r in rows)
    horizon = summary["seconds"]
    bucket = max(1.0, horizon / 60)
    count = int(horizon // bucket) + 1
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for m in methods:
        tokens = [0.0] * count
        for r in rows:
            if r["method"] == m and succeeded(r):
                tokens[min(count - 1, int((r["start_s"] - begin + r["e2e_ms"] / 1e3) // bucket))] += r["output_tokens"]
        ax.plot([i * bucket for i in range(count)], [t / bucket for t in tokens], label=m)
    failed_at = [r["start_s"] - begin + (r["e2e_ms"] or 0.0) / 1e3 for r in rows if not succeeded(r)]
    for i, t in enumerate(failed_at):
        ax.axvline(t, color="red", alpha=0.4, linewidth=1, label="a request failed" if i == 0 else None)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput over time (by completion time) and failures")
    ax.legend()
    plots["Throughput over time and failures"] = _figure_png(fig)
    plt.close(fig)

    tenants = list(summary["by_tenant"])
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(tenants)), 3.4))
    for i, q in enumerate((50, 99)):
        values = [summary["by_tenant"][t][f"ttft_ms_p{q}"] or 0.0 for t in tenants]
        ax.bar([x + i * 0.4 for x in range(len(tenants))], values, 0.4, label=f"p{q}")
    ax.set_xticks([x + 0.2 for x in range(len(tenants))], tenants, rotation=45, ha="right")
    ax.set_ylabel("ms")
    ax.set_title("TTFT per tenant")
    ax.legend()
    plots["TTFT per tenant"] = _figure_png(fig)
    plt.close(fig)
    return plots


def _ms(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def headline_rows(summary: dict) -> list[list[str]]:
    """Per method: TTFT and TPOT p50/p99 and their ratios to the base model."""
    return [
        [m, str(s["requests"]), str(s["failed"]), _ms(s["ttft_ms_p50"]), _ms(s["ttft_ms_p99"]), _ms(s["itl_ms_p50"]),
         _ms(s["itl_ms_p99"]), _ratio(s["ttft_ms_p50_over_base"]), _ratio(s["ttft_ms_p99_over_base"]),
         _ratio(s["itl_ms_p50_over_base"]), _ratio(s["itl_ms_p99_over_base"])]
        for m, s in summary["by_method"].items()
    ]


HEADLINE = ["method", "requests", "failed", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
            "TTFT p50 / base", "TTFT p99 / base", "TPOT p50 / base", "TPOT p99 / base"]


def render_html(rows: list[dict], summary: dict, spec: LoadTestSpec, title: str) -> str:
    """The HTML page (templates/report.html.j2): the summary's tables, the plots inline."""
    detail = ["requests", "failed"] + [f"{METRICS[k]} p{q} ms" for k in METRICS for q in QUANTILES] + ["output tok/s", "goodput req/s", "within SLO"]

    def detail_row(s: dict) -> list[str]:
        return ([str(s["requests"]), str(s["failed"])] + [_ms(s[f"{k}_p{q}"]) for k in METRICS for q in QUANTILES]
                + [f"{s['output_tokens_per_s']:.1f}", f"{s['goodput_per_s']:.2f}", f"{s['slo_attainment']:.0%}"])

    return _TEMPLATES.get_template("report.html.j2").render(
        title=title, summary=summary, spec=spec, plots=_plots(rows, summary),
        headline=(HEADLINE, headline_rows(summary)),
        by_method=(["method"] + detail, [[m] + detail_row(s) for m, s in summary["by_method"].items()]),
        by_tenant=(["tenant", "method"] + detail, [[t, s["method"]] + detail_row(s) for t, s in summary["by_tenant"].items()]),
        failures=[[k, str(v)] for k, v in summary["failures"].items()],
    )


def write_report(records: Path, spec: LoadTestSpec, out: Path, title: str) -> Path:
    rows = read_records(records)
    summary = summarize(rows, spec)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    page = out / "report.html"
    page.write_text(render_html(rows, summary, spec, title))
    return page
