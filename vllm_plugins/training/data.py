"""Tokenised tenant examples and the batches the trainer feeds an adapted model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.tasks.suite import Example


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]  # starts with <bos>
    answer_ids: list[int]  # ends with <eos>


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def encode(tokenizer, examples: list[Example]) -> list[EncodedExample]:
    return [
        EncodedExample(
            prompt_ids=encode_prompt(tokenizer, ex.prompt),
            answer_ids=tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        )
        for ex in examples
    ]


@dataclass
class TrainBatch:
    """Right-padded prompt + answer rows.

    ``pool_mask``: the prompt's tokens; ``adapt_mask``: the last prompt token and the
    answer (the positions a prompt-aware adapter acts on); ``labels``: the answer only.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pool_mask: torch.Tensor
    adapt_mask: torch.Tensor


def collate(examples: list[EncodedExample], pad_id: int) -> TrainBatch:
    width = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    shape = (len(examples), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    pool = torch.zeros(shape, dtype=torch.bool)
    adapt = torch.zeros(shape, dtype=torch.bool)
    for row, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.answer_ids)
        ids[row, :n] = torch.tensor(e.prompt_ids + e.answer_ids)
        # logits at position t predict token t + 1: the answer is predicted from n_p - 1 on
        labels[row, n_p - 1 : n - 1] = torch.tensor(e.answer_ids)
        attention[row, :n] = 1
        pool[row, :n_p] = True
        adapt[row, n_p - 1 : n] = True
    return TrainBatch(ids, attention, labels, pool, adapt)
