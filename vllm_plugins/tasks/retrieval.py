"""Long-context key/value retrieval, the task KV-cache eviction is judged on.

A context is a stream of filler words with key/value facts scattered in it. Each fact is
one composite token ``kK:vV`` that carries its key and its value (composite facts are what
a small model learns to retrieve quickly on two CPU cores). Every value names a key
(``vX`` names ``kX``) and every such key has a fact, so facts form chains. A question
``? kA =`` asks to follow the chain from ``kA`` for four steps: the answer is
``vB vC vD vE`` with facts ``kA:vB``, ``kB:vC``, ``kC:vD`` and ``kD:vE``.

The answer is a chain on purpose. A request's first token is computed while its whole
prompt is still cached, and a model can fetch the value of a key named in the prompt
while it reads the prompt, so a question that names all its keys can be answered from
the question's own cached tokens. The later steps of a chain need facts that no prompt
token names: they are looked up during decoding, in what KV cache eviction kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_KEYS = 32
NUM_VALUES = 16
NUM_FILLERS = 64
QUERY = "?"
ANSWER = "="
CHAIN_STEPS = 4


def key_token(k: int) -> str:
    return f"k{k}"


def value_token(v: int) -> str:
    return f"v{v}"


def fact_token(k: int, v: int) -> str:
    return f"k{k}:v{v}"


def filler_token(i: int) -> str:
    return f"w{i}"


def retrieval_vocabulary() -> list[str]:
    words = [QUERY, ANSWER]
    words += [key_token(k) for k in range(NUM_KEYS)]
    words += [value_token(v) for v in range(NUM_VALUES)]
    words += [fact_token(k, v) for k in range(NUM_KEYS) for v in range(NUM_VALUES)]
    words += [filler_token(i) for i in range(NUM_FILLERS)]
    return words


@dataclass(frozen=True)
class Question:
    start: str  # the key the chain starts from
    values: list[str]  # the chain's values, in order

    @property
    def words(self) -> list[str]:
        return [QUERY, self.start, ANSWER]


@dataclass(frozen=True)
class RetrievalExample:
    context: list[str]
    questions: list[Question]

    @property
    def prompt(self) -> str:
        """Context plus the first question: what a served request sends."""
        return " ".join(self.context + self.questions[0].words)

    @property
    def answer(self) -> str:
        return " " + " ".join(self.questions[0].values)

    def chain_facts(self, question: Question) -> list[int]:
        """Context indices of the facts ``question``'s chain follows, in order."""
        fact_of = {word.partition(":")[0]: i for i, word in enumerate(self.context) if ":" in word}
        keys = [question.start] + [key_token(int(value[1:])) for value in question.values[:-1]]
        return [fact_of[key] for key in keys]


def make_retrieval_example(rng: random.Random, length: int, num_questions: int = 1) -> RetrievalExample:
    """A context of ``length`` words holding one fact for each of the ``NUM_VALUES`` keys
    that values name, and questions that each follow a chain of ``CHAIN_STEPS`` facts."""
    if length < NUM_VALUES:
        raise ValueError(f"a retrieval context needs at least {NUM_VALUES} words for its facts, got {length}")
    facts = {k: rng.randrange(NUM_VALUES) for k in range(NUM_VALUES)}
    context = [filler_token(rng.randrange(NUM_FILLERS)) for _ in range(length)]
    for slot, k in zip(rng.sample(range(length), NUM_VALUES), facts):
        context[slot] = fact_token(k, facts[k])
    questions = []
    for _ in range(num_questions):
        key = start = rng.randrange(NUM_VALUES)
        values = []
        for _ in range(CHAIN_STEPS):
            key = facts[key]
            values.append(value_token(key))
        questions.append(Question(key_token(start), values))
    return RetrievalExample(context, questions)
