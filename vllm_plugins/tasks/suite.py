"""Seeded tenant tasks with train / dev / test splits.

A tenant task is one operation from :mod:`vllm_plugins.tasks.ops` behind the generic
instruction: prompt ``a q f #task =`` and answer ``f q a`` for the ``reverse`` tenant.
Splits are disjoint in their inputs and reproducible from the task's seed.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from vllm_plugins.tasks.ops import LETTERS, OPS, TASK, Op

MIN_LETTERS = 3
MAX_LETTERS = 7
SPLIT_SIZES = {"train": 2000, "dev": 200, "test": 200}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSplits:
    name: str
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def sample_letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS))]


def format_example(letters: list[str], op: Op, instructed: bool) -> Example:
    """``x1 .. xn #op =`` (instructed) or ``x1 .. xn #task =`` -> `` y1 .. ym``.

    The answer starts with its separator space. The instruction follows the input, so the
    operation is carried out from the end of the prompt on, where a prompt-aware adapter
    acts; a tenant prompt has the same length and positions as an instructed one.
    """
    instruction = op.instruction if instructed else TASK
    return Example(prompt=f"{' '.join(letters)} {instruction} =", answer=" " + " ".join(op(letters)))


def task_names() -> list[str]:
    return list(OPS)


def _task_seed(name: str, seed: int) -> int:
    return zlib.crc32(f"{name}:{seed}".encode())


def load_task(name: str, seed: int = 0) -> TaskSplits:
    """Generate the splits of tenant task ``name``; inputs never repeat across splits."""
    if name not in OPS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(OPS)}")
    rng = random.Random(_task_seed(name, seed))
    seen: set[tuple[str, ...]] = set()
    splits: dict[str, list[Example]] = {}
    for split, size in SPLIT_SIZES.items():
        examples: list[Example] = []
        while len(examples) < size:
            letters = sample_letters(rng)
            if tuple(letters) in seen:
                continue
            seen.add(tuple(letters))
            examples.append(format_example(letters, OPS[name], instructed=False))
        splits[split] = examples
    return TaskSplits(name=name, **splits)
