"""Progress lines for long steps: what runs, how far it is, how long is left."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``[label] i/total ... elapsed, eta`` at most every ``every`` seconds."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.start = self._last = time.monotonic()

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every and done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        print(
            f"[{self.label}] {done}/{self.total} {note} "
            f"(elapsed {elapsed:.0f}s, eta {eta:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(label: str, message: str) -> None:
    print(f"[{label}] {message}", file=sys.stderr, flush=True)
