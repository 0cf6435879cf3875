"""`bench eviction --task`: the prompts each task's bench asks, without an engine."""

from __future__ import annotations

from vllm_plugins.bench.eviction import CROWDED_WORDS, PRESETS, TASKS, bench_examples, with_task
from vllm_plugins.cli import build_parser
from vllm_plugins.tasks.retrieval import MAX_KEYS_PER_CONTEXT, NUM_KEYS, NUM_SLOTS


def _keys(example) -> set[str]:
    return {w.split(".")[0] for w in example.context if ":" in w}


def test_the_default_task_is_the_retrieval_task_as_before():
    bench = PRESETS["default"]
    assert bench.task == "retrieval" and with_task(bench, "retrieval") == bench
    examples = bench_examples(bench)
    assert len(examples) == 100 and all(len(_keys(e)) == MAX_KEYS_PER_CONTEXT for e in examples)


def test_the_crowded_task_asks_every_keys_facts_in_shorter_contexts():
    for preset, words in (("default", CROWDED_WORDS), ("tiny", PRESETS["tiny"].prompt_words)):
        bench = with_task(PRESETS[preset], "crowded-retrieval")
        assert bench.task == "crowded-retrieval" and bench.prompt_words == words
        examples = bench_examples(bench)
        assert len(examples) == bench.accuracy_prompts
        for e in examples:
            assert len(e.context) == words and len(_keys(e)) == NUM_KEYS
            assert sum(":" in w for w in e.context) == NUM_KEYS * NUM_SLOTS


def test_the_cli_takes_the_task():
    args = build_parser().parse_args(["bench", "eviction", "--json", "x.json", "--task", "crowded-retrieval"])
    assert args.task == "crowded-retrieval"
    assert build_parser().parse_args(["bench", "eviction", "--json", "x.json"]).task == "retrieval"
    assert set(TASKS) == {"retrieval", "crowded-retrieval"}
