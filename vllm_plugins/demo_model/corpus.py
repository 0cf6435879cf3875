"""The seeded pre-training corpus of the demo model.

Two kinds of sequences:

* instructed operations ``<bos> x1 .. xn #op = y1 .. ym <eos>`` for every operation in
  :data:`~vllm_plugins.tasks.ops.OPS`, and generic ones ``<bos> x1 .. xn #task = x1 .. xn
  <eos>`` that teach the model to copy for the generic instruction;
* long-context retrieval: filler with scattered ``kK.S:vV`` facts and two questions
  ``? kA kA.0:vB kA.1:vC kA.2:vD kA.3:vE`` (a key's facts in slot order) per sequence, so
  every sequence gives dense supervision.

Every sample comes with a loss mask that covers only what the model must predict (the
answer and its ``<eos>``, the values after each question).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from vllm_plugins.tasks.ops import COPY, DIGITS, LETTERS, OPS, TASK, UPPER
from vllm_plugins.tasks.retrieval import make_retrieval_example, retrieval_vocabulary
from vllm_plugins.tasks.suite import format_example, sample_letters

INSTRUCTED_FRACTION = 0.75
QUESTIONS_PER_CONTEXT = 2


def corpus_vocabulary() -> list[str]:
    """Every word the corpus can produce, in a fixed order."""
    return (
        list(LETTERS) + list(UPPER) + list(DIGITS) + ["=", TASK]
        + [op.instruction for op in OPS.values()]
        + retrieval_vocabulary()
    )


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq)
    labels: torch.Tensor  # (batch, seq), -100 where no loss


def _collate(samples: list[tuple[list[int], list[bool]]], pad_id: int) -> TokenBatch:
    width = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, (toks, loss) in enumerate(samples):
        n = len(toks)
        ids[row, :n] = torch.tensor(toks)
        mask[row, :n] = 1
        target = torch.tensor(toks)
        target[~torch.tensor(loss)] = -100
        labels[row, :n] = target
    return TokenBatch(ids, mask, labels)


class CorpusSampler:
    """Draws token batches from the corpus with a fixed seed."""

    def __init__(self, vocab: dict[str, int], seed: int):
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.bos, self.eos, self.pad = vocab["<bos>"], vocab["<eos>"], vocab["<pad>"]

    def _ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def operation_sample(self) -> tuple[list[int], list[bool]]:
        letters = sample_letters(self.rng)
        if self.rng.random() < INSTRUCTED_FRACTION:
            ex = format_example(letters, self.rng.choice(list(OPS.values())), instructed=True)
        else:
            ex = format_example(letters, COPY, instructed=False)
        prompt, answer = [self.bos] + self._ids(ex.prompt), self._ids(ex.answer) + [self.eos]
        return prompt + answer, [False] * len(prompt) + [True] * len(answer)

    def retrieval_sample(self, length: int) -> tuple[list[int], list[bool]]:
        ex = make_retrieval_example(self.rng, length, num_questions=QUESTIONS_PER_CONTEXT)
        ids, loss = [self.bos] + self._ids(" ".join(ex.context)), [False] * (length + 1)
        for question in ex.questions:
            ids += self._ids(" ".join(question.words + question.facts))
            loss += [False] * len(question.words) + [True] * len(question.facts)
        return ids, loss

    def operation_batch(self, size: int) -> TokenBatch:
        return _collate([self.operation_sample() for _ in range(size)], self.pad)

    def retrieval_batch(self, size: int, length: int) -> TokenBatch:
        return _collate([self.retrieval_sample(length) for _ in range(size)], self.pad)
