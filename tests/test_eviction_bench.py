"""`vllm-plugins bench eviction` end to end on the tiny model: every configuration is
measured, and vLLM's own block pool shows evicted requests holding fewer blocks."""

from __future__ import annotations

import math

from vllm_plugins.bench.eviction import PRESETS, format_report, run_eviction_bench
from vllm_plugins.eviction.policies import POLICIES


def test_bench_eviction_tiny_measures_every_configuration(tiny_llama):
    bench = PRESETS["tiny"]
    report = run_eviction_bench(bench)
    rows = {(r["policy"], r["keep_ratio"]): r for r in report["results"]}
    assert set(rows) == {("off", None)} | {(p, r) for p in POLICIES for r in bench.ratios}
    off = rows["off", None]
    prompt_blocks = math.ceil(report["prompt_tokens"] / bench.block_size)
    assert off["blocks_after_prefill"] == prompt_blocks
    for (policy, ratio), row in rows.items():
        assert 0 <= row["value_accuracy"] <= 1 and row["prefill_ms"] > 0 and row["tpot_ms"] > 0
        if policy != "off":
            assert row["blocks_after_prefill"] <= ratio * prompt_blocks + 1, row
            assert row["most_running"] > off["most_running"], row
    assert "streaming_llm" in format_report(report)
