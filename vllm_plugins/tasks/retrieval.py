"""Long-context retrieval of a key's facts, the task KV-cache eviction is judged on.

A context is a stream of filler words with facts scattered in it. A key has one fact per
slot, ``NUM_SLOTS`` in all; a fact is one composite token ``kK.S:vV`` that carries its
key K, its slot S and its value V (composite facts are what a small model learns to
retrieve quickly on two CPU cores). A question ``? kK`` asks for K's facts in slot
order: the answer is ``kK.0:vA kK.1:vB kK.2:vC kK.3:vD``, wherever they lie.

The answer is several facts on purpose. A request's first token is computed while its
whole prompt is still cached; each later one is looked up during decoding, from the fact
just written (which names the key and the slot to look up next), in what KV cache
eviction kept. The question names the key, so a policy that reads the question's
attention can tell which facts matter; a recent window or a random sample cannot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_KEYS = 16
NUM_SLOTS = 4
NUM_VALUES = 8
NUM_FILLERS = 64
QUERY = "?"
MAX_KEYS_PER_CONTEXT = 8
WORDS_PER_KEY = 32  # contexts get one key per this many words, 2 to MAX_KEYS_PER_CONTEXT


def key_token(k: int) -> str:
    return f"k{k}"


def fact_token(k: int, slot: int, v: int) -> str:
    return f"k{k}.{slot}:v{v}"


def filler_token(i: int) -> str:
    return f"w{i}"


def retrieval_vocabulary() -> list[str]:
    words = [QUERY] + [key_token(k) for k in range(NUM_KEYS)]
    words += [fact_token(k, s, v) for k in range(NUM_KEYS) for s in range(NUM_SLOTS) for v in range(NUM_VALUES)]
    words += [filler_token(i) for i in range(NUM_FILLERS)]
    return words


@dataclass(frozen=True)
class Question:
    key: int
    facts: list[str]  # the answer: the key's facts in slot order

    @property
    def words(self) -> list[str]:
        return [QUERY, key_token(self.key)]


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
        return " " + " ".join(self.questions[0].facts)

    def answer_positions(self, question: Question) -> list[int]:
        """Context indices of the facts ``question``'s answer copies, in slot order."""
        return [self.context.index(fact) for fact in question.facts]


def keys_in_context(length: int) -> int:
    return max(2, min(MAX_KEYS_PER_CONTEXT, length // WORDS_PER_KEY))


def make_retrieval_example(rng: random.Random, length: int, num_questions: int = 1,
                           num_keys: int | None = None) -> RetrievalExample:
    """A context of ``length`` words holding every slot's fact for ``num_keys`` distinct
    keys (default: :func:`keys_in_context`; ``NUM_KEYS``: every key of the vocabulary, the
    crowded context), and questions that each ask for one of those keys."""
    num_keys = keys_in_context(length) if num_keys is None else num_keys
    if not 1 <= num_keys <= NUM_KEYS:
        raise ValueError(f"a retrieval context holds 1 to {NUM_KEYS} keys, not {num_keys}")
    if length < num_keys * NUM_SLOTS:
        raise ValueError(f"a retrieval context needs at least {num_keys * NUM_SLOTS} words for its facts, got {length}")
    keys = rng.sample(range(NUM_KEYS), num_keys)
    facts = {k: [fact_token(k, s, rng.randrange(NUM_VALUES)) for s in range(NUM_SLOTS)] for k in keys}
    context = [filler_token(rng.randrange(NUM_FILLERS)) for _ in range(length)]
    for position, fact in zip(rng.sample(range(length), num_keys * NUM_SLOTS), (f for k in keys for f in facts[k])):
        context[position] = fact
    questions = [Question(k, facts[k]) for k in (rng.choice(keys) for _ in range(num_questions))]
    return RetrievalExample(context, questions)
