from vllm_plugins.tasks import OPS, load_task, task_names
from vllm_plugins.tasks.ops import TASK
from vllm_plugins.tasks.retrieval import MAX_KEYS_PER_CONTEXT, NUM_KEYS, NUM_SLOTS, make_retrieval_example
import hashlib
import random

import pytest


def test_suite_has_at_least_eight_tasks():
    assert len(task_names()) >= 8


def test_splits_are_disjoint_and_reproducible():
    for name in task_names():
        a, b = load_task(name), load_task(name)
        assert a == b
        prompts = [set(e.prompt for e in split) for split in (a.train, a.dev, a.test)]
        assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])


def test_tenant_prompts_carry_only_the_generic_instruction():
    for name in task_names():
        ex = load_task(name).test[0]
        assert not any(op.instruction in ex.prompt for op in OPS.values())
        assert ex.prompt.endswith(f" {TASK} =")
        letters = ex.prompt.removesuffix(f" {TASK} =").split()
        assert ex.answer.split() == OPS[name](letters)


def test_retrieval_answer_is_the_asked_keys_facts_in_slot_order():
    ex = make_retrieval_example(random.Random(0), length=1200, num_questions=3)
    facts = [w for w in ex.context if ":" in w]
    keys = {fact.split(".")[0] for fact in facts}
    assert len(keys) == MAX_KEYS_PER_CONTEXT and len(facts) == MAX_KEYS_PER_CONTEXT * NUM_SLOTS
    for question in ex.questions:
        key = f"k{question.key}"
        assert question.words == ["?", key]
        assert question.facts == [next(f for f in facts if f.startswith(f"{key}.{slot}:")) for slot in range(NUM_SLOTS)]
        assert [ex.context[i] for i in ex.answer_positions(question)] == question.facts
    assert ex.answer.split() == ex.questions[0].facts
    assert ex.prompt.split() == ex.context + ["?", f"k{ex.questions[0].key}"] and len(ex.context) == 1200


def test_short_retrieval_contexts_hold_fewer_keys():
    ex = make_retrieval_example(random.Random(0), length=64)
    assert len({w.split(".")[0] for w in ex.context if ":" in w}) == 2


def test_default_retrieval_prompts_are_unchanged():
    """The bench's and the demo corpus's contexts, as before crowded contexts existed."""
    rng = random.Random(0)
    prompts = "\n".join(make_retrieval_example(rng, 1000).prompt for _ in range(3))
    assert hashlib.sha256(prompts.encode()).hexdigest() == "a7a7b30fb223712414a56ee2ab2fa8b3e5ac83c2bebefd7807845fa1ca10d6bf"


def test_crowded_context_holds_every_keys_facts_once():
    for seed in range(5):
        ex = make_retrieval_example(random.Random(seed), length=500, num_questions=3, num_keys=NUM_KEYS)
        facts = [w for w in ex.context if ":" in w]
        assert len(facts) == len(set(facts)) == NUM_KEYS * NUM_SLOTS and len(ex.context) == 500
        assert sorted(f.split(":")[0] for f in facts) == sorted(f"k{k}.{s}" for k in range(NUM_KEYS) for s in range(NUM_SLOTS))
        for question in ex.questions:
            assert question.facts == [next(f for f in facts if f.startswith(f"k{question.key}.{slot}:")) for slot in range(NUM_SLOTS)]
            assert [ex.context[i] for i in ex.answer_positions(question)] == question.facts
        assert ex.answer.split() == ex.questions[0].facts


def test_a_context_holds_one_to_every_key():
    with pytest.raises(ValueError, match="1 to 16 keys"):
        make_retrieval_example(random.Random(0), length=500, num_keys=NUM_KEYS + 1)
    with pytest.raises(ValueError, match="at least 64 words"):
        make_retrieval_example(random.Random(0), length=60, num_keys=NUM_KEYS)
