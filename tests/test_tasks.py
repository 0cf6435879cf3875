from vllm_plugins.tasks import OPS, load_task, task_names
from vllm_plugins.tasks.ops import TASK
from vllm_plugins.tasks.retrieval import CHAIN_STEPS, NUM_VALUES, make_retrieval_example
import random


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


def test_retrieval_answer_follows_the_chain_of_facts_from_the_asked_key():
    ex = make_retrieval_example(random.Random(0), length=1200)
    facts = dict(w.split(":") for w in ex.context if ":" in w)
    assert len(facts) == NUM_VALUES  # every value names a key that has a fact
    question = ex.questions[0]
    key, chain = question.start, []
    for _ in range(CHAIN_STEPS):
        chain.append(facts[key])
        key = "k" + facts[key][1:]
    assert question.values == chain and ex.answer.split() == chain
    starts = [question.start] + ["k" + value[1:] for value in chain[:-1]]
    assert [ex.context[i] for i in ex.chain_facts(question)] == [f"{k}:{v}" for k, v in zip(starts, chain)]
    assert ex.prompt.split()[-3:] == ["?", question.start, "="]
    assert len(ex.prompt.split()) == 1200 + 3
