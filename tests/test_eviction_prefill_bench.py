"""`vllm-plugins bench eviction-prefill`: the wider model it times and the arguments it
refuses (its engine and timing are `bench eviction`'s, run end to end in
test_eviction_bench.py)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoTokenizer

from helpers import run_cli
from vllm_plugins.bench.eviction_prefill import format_prefill_report, wider_model
from vllm_plugins.demo_model import build_demo_model


def test_the_wider_model_has_the_demo_models_tokenizer_and_layers_and_the_asked_width(tmp_path):
    parameters = wider_model(256, tmp_path / "wide")
    config, demo = AutoConfig.from_pretrained(tmp_path / "wide"), AutoConfig.from_pretrained(build_demo_model("demo"))
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (256, 4, 2, 64)
    assert config.intermediate_size == 768 and config.num_hidden_layers == demo.num_hidden_layers
    assert config.vocab_size == demo.vocab_size and config.rope_parameters == demo.rope_parameters
    text = "k3 = v1 v2 v3 v4"
    assert AutoTokenizer.from_pretrained(tmp_path / "wide")(text).input_ids == \
        AutoTokenizer.from_pretrained(build_demo_model("demo"))(text).input_ids
    embeddings = 671 * 256
    assert parameters > 2 * embeddings and parameters == 2 * embeddings + 4 * (2 * 256 + 256 * 256 * 2 + 2 * 256 * 128 + 3 * 256 * 768) + 256
    with pytest.raises(ValueError, match="multiple of 128"):
        wider_model(200, tmp_path / "bad")


@pytest.mark.parametrize("args, message", [
    (["--hidden", "100"], "multiple of 128"),
    (["--hidden", "16384"], "multiple of 128 from 128 to 8192"),
    (["--prompts", "0"], "from 1 to 100"),
    (["--prompts", "101"], "from 1 to 100"),
])
def test_bad_arguments_are_refused_before_any_model_is_built(args, message, tmp_path):
    status, stderr = run_cli("bench", "eviction-prefill", "--json", str(tmp_path / "out.json"), *args)
    assert status == 2 and message in stderr
    assert not (tmp_path / "out.json").exists()


def test_the_report_shows_every_configuration_against_eviction_off():
    report = {"bench": {"hidden": 512, "prompts": 8}, "parameters": 13_274_624, "prompt_words": 1000,
              "compilation_mode": "DYNAMO_TRACE_ONCE",
              "results": [{"policy": "off", "keep_ratio": None, "prefill_ms": 158.1, "prefill_vs_off": 1.0,
                           "first_decode_ms": 6.3, "first_decode_vs_off": 1.0, "tpot_ms": 6.07},
                          {"policy": "sca", "keep_ratio": 0.5, "prefill_ms": 178.4, "prefill_vs_off": 1.129,
                           "first_decode_ms": 24.1, "first_decode_vs_off": 3.825, "tpot_ms": 6.62}]}
    lines = format_prefill_report(report).splitlines()
    assert "width 512 (13,274,624 parameters)" in lines[0]
    assert lines[2].split() == ["off", "-", "158.1", "1.000", "6.30", "1.000", "6.07"]
    assert lines[3].split() == ["sca", "0.5", "178.4", "1.129", "24.10", "3.825", "6.62"]
