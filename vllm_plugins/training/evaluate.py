"""Held-out exact match of an adapted model on a tenant task."""

from __future__ import annotations

from vllm_plugins.tasks.suite import Example
from vllm_plugins.training.data import encode_prompt
from vllm_plugins.training.generation import greedy_generate

MAX_NEW_TOKENS = 16


def generate_answers(
    lm, tokenizer, prompts: list[str], batch_size: int = 100, max_new_tokens: int = MAX_NEW_TOKENS,
    margins: list[float] | None = None,
) -> list[str]:
    """Greedy answers, decoded; ``margins`` as in :func:`~.generation.greedy_decode`."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        outs = greedy_generate(lm, chunk, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, margins)
        answers += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return answers


def exact_match(lm, tokenizer, examples: list[Example]) -> float:
    """Share of examples whose greedy answer equals the reference answer."""
    answers = generate_answers(lm, tokenizer, [e.prompt for e in examples])
    return sum(a == e.answer.strip() for a, e in zip(answers, examples)) / len(examples)
