"""`vllm-plugins bench eviction` end to end on the tiny model: every configuration is
measured, and vLLM's own block pool shows evicted requests holding fewer blocks.

The command runs in a child process, as a user runs it: its engine runs in-process, and
this test process stays free of what that engine imports (Ray among them)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from vllm_plugins.bench.eviction import PRESETS
from vllm_plugins.eviction.policies import POLICIES

pytestmark = pytest.mark.engine


def test_bench_eviction_tiny_measures_every_configuration(tiny_llama, tmp_path):
    out = tmp_path / "eviction.json"
    done = subprocess.run(
        [sys.executable, "-m", "vllm_plugins.cli", "bench", "eviction", "--preset", "tiny", "--json", str(out)],
        capture_output=True, text=True, env=os.environ.copy(), timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streaming_llm" in done.stdout and "facts kept" in done.stdout
    bench = PRESETS["tiny"]
    config = AutoConfig.from_pretrained(tiny_llama)
    report = json.loads(out.read_text())
    rows = {(r["policy"], r["keep_ratio"]): r for r in report["results"]}
    assert set(rows) == {("off", None)} | {(p, r) for p in POLICIES for r in bench.ratios}
    off = rows["off", None]
    prompt_blocks = math.ceil(report["prompt_tokens"] / bench.block_size)
    assert off["blocks_after_prefill"] == prompt_blocks
    for (policy, ratio), row in rows.items():
        assert 0 <= row["fact_accuracy"] <= 1 and row["prefill_ms"] > 0 and row["tpot_ms"] > 0
        assert row["first_decode_ms"] > 0 and row["first_decode_vs_off"] > 0
        if policy != "off":
            assert row["blocks_after_prefill"] <= ratio * prompt_blocks + 1, row
            shares = row["later_facts_kept"]  # per layer and KV head
            assert [len(layer) for layer in shares] == [config.num_key_value_heads] * config.num_hidden_layers, row
            assert all(0 <= share <= 1 for layer in shares for share in layer), row
            assert row["most_running"] > off["most_running"], row
