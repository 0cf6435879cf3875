"""Long-context key/value retrieval, the task KV-cache eviction is judged on.

A context is a stream of filler words with key/value facts scattered in it. Each fact is
one composite token ``kK:vV`` that carries its key and its value (composite facts are what
a small model learns to retrieve quickly on two CPU cores). A query ``? kK`` asks for the
value of key ``K``; the answer is ``vV``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_KEYS = 32
NUM_VALUES = 16
NUM_FILLERS = 64
QUERY = "?"


def key_token(k: int) -> str:
    return f"k{k}"


def value_token(v: int) -> str:
    return f"v{v}"


def fact_token(k: int, v: int) -> str:
    return f"k{k}:v{v}"


def filler_token(i: int) -> str:
    return f"w{i}"


def retrieval_vocabulary() -> list[str]:
    words = [QUERY]
    words += [key_token(k) for k in range(NUM_KEYS)]
    words += [value_token(v) for v in range(NUM_VALUES)]
    words += [fact_token(k, v) for k in range(NUM_KEYS) for v in range(NUM_VALUES)]
    words += [filler_token(i) for i in range(NUM_FILLERS)]
    return words


@dataclass(frozen=True)
class RetrievalExample:
    context: list[str]
    queries: list[tuple[str, str]]  # (key token, value token)

    @property
    def prompt(self) -> str:
        """Context plus the first query: what a served request sends."""
        return " ".join(self.context + [QUERY, self.queries[0][0]])

    @property
    def answer(self) -> str:
        return " " + self.queries[0][1]


def make_retrieval_example(
    rng: random.Random, length: int, num_facts: int = 16, num_queries: int = 1
) -> RetrievalExample:
    """A context of ``length`` words holding ``num_facts`` facts with distinct keys."""
    num_facts = max(1, min(num_facts, NUM_KEYS, length // 4))
    keys = rng.sample(range(NUM_KEYS), num_facts)
    facts = {k: rng.randrange(NUM_VALUES) for k in keys}
    context = [filler_token(rng.randrange(NUM_FILLERS)) for _ in range(length)]
    for slot, k in zip(rng.sample(range(length), num_facts), keys):
        context[slot] = fact_token(k, facts[k])
    asked = [rng.choice(keys) for _ in range(num_queries)]
    return RetrievalExample(context, [(key_token(k), value_token(facts[k])) for k in asked])
