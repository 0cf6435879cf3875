"""The string operations behind the tenant tasks.

Each operation maps a short sequence of lower-case letters to an output sequence of
tokens. The demo base model learns every operation behind its own instruction token
(``a b c #reverse = c b a``) and learns to *copy* for the generic instruction ``#task``
(``a b c #task = a b c``). A tenant's prompts carry the generic ``#task``, so the base
model copies and scores (near) zero; the tenant's adapter has to make ``#task`` mean the
tenant's operation. This mirrors how fine-tunes steer skills a base model already has.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

LETTERS: tuple[str, ...] = tuple(string.ascii_lowercase)
UPPER: tuple[str, ...] = tuple(string.ascii_uppercase)
DIGITS: tuple[str, ...] = tuple(string.digits)


def _shift(xs: list[str]) -> list[str]:
    return [LETTERS[(LETTERS.index(x) + 1) % 26] for x in xs]


def _swap_pairs(xs: list[str]) -> list[str]:
    out = list(xs)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


@dataclass(frozen=True)
class Op:
    """One operation: its name, instruction token and function."""

    name: str
    fn: Callable[[list[str]], list[str]]

    @property
    def instruction(self) -> str:
        return f"#{self.name}"

    def __call__(self, xs: list[str]) -> list[str]:
        return self.fn(list(xs))


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("reverse", lambda xs: xs[::-1]),
        Op("sort", sorted),
        Op("shift", _shift),
        Op("swap", _swap_pairs),
        Op("rotate", lambda xs: xs[1:] + xs[:1]),
        Op("double", lambda xs: [x for x in xs for _ in range(2)]),
        Op("upper", lambda xs: [x.upper() for x in xs]),
        Op("ends", lambda xs: [xs[0], xs[-1]]),
        Op("count", lambda xs: [str(len(xs))]),
        Op("mirror", lambda xs: xs + xs[::-1]),
    )
}

TASK = "#task"
"""The generic instruction of tenant prompts."""

COPY = Op("copy", list)
"""What the base model does for the generic instruction."""
