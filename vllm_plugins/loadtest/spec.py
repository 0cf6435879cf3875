"""What a load test sends: tenants per method, their popularity, request shapes and SLOs.

Read from a TOML file (``configs/loadtest-*.toml``). Pure Python, so that Locust's gevent
process imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("base", "lora", "fanlora", "iapt", "para", "milora")
"""One Locust user class per method, in this order."""


def user_class_name(method: str) -> str:
    """The Locust user class of a method's tenants (loadtests/locustfile.py)."""
    return f"{method.title()}User"


@dataclass(frozen=True)
class LengthDistribution:
    """Token counts: ``lognormal`` (median ``median``, shape ``sigma``), ``uniform``
    (``low`` to ``high``) or ``fixed`` (``median``); always clipped to [low, high]."""

    kind: str = "lognormal"
    median: float = 64
    sigma: float = 0.5
    low: int = 1
    high: int = 512

    def __post_init__(self):
        if self.kind not in ("lognormal", "uniform", "fixed"):
            raise ValueError(f"unknown length distribution {self.kind!r}: lognormal, uniform or fixed")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"length bounds must satisfy 1 <= low <= high, got {self.low}, {self.high}")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            value = rng.uniform(self.low, self.high)
        elif self.kind == "fixed":
            value = self.median
        else:
            value = self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return int(min(self.high, max(self.low, round(value))))


@dataclass(frozen=True)
class Tenant:
    name: str
    method: str
    model: str  # the ``model`` field of its requests: its adapter, or the base model's name


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True)
class LoadTestSpec:
    tenants: tuple[Tenant, ...]
    prompt: LengthDistribution
    output: LengthDistribution
    slo: Slo
    zipf_exponent: float = 1.1
    users: int = 16
    spawn_rate: float = 16
    max_requests: int = 200
    run_time_s: int = 120
    request_timeout_s: float = 120
    seed: int = 0
    method_weights: dict[str, float] = field(default_factory=dict)
    words: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = sorted({t.method for t in self.tenants} - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: one of {', '.join(METHODS)}")
        if not self.tenants:
            raise ValueError("a load test needs at least one tenant")
        if self.max_requests < 1 or self.run_time_s < 1 or self.users < 1:
            raise ValueError("max_requests, run_time_s and users must be positive")

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods with tenants, in :data:`METHODS` order."""
        present = {t.method for t in self.tenants}
        return tuple(m for m in METHODS if m in present)

    def tenants_of(self, method: str) -> tuple[Tenant, ...]:
        return tuple(t for t in self.tenants if t.method == method)

    def with_words(self, words: list[str]) -> LoadTestSpec:
        return LoadTestSpec(**{**self.__dict__, "words": tuple(words)})

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadTestSpec:
        raw = json.loads(text)
        return cls(
            tenants=tuple(Tenant(**t) for t in raw.pop("tenants")),
            prompt=LengthDistribution(**raw.pop("prompt")),
            output=LengthDistribution(**raw.pop("output")),
            slo=Slo(**raw.pop("slo")),
            words=tuple(raw.pop("words")),
            **raw,
        )


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Popularity of ranks 1..count under Zipf's law: proportional to 1 / rank^exponent."""
    raw = [1.0 / rank**exponent for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def load_spec(path: Path) -> LoadTestSpec:
    """A load test from TOML: ``[load]`` (users, rates, bounds, seed), ``[slo]``,
    ``[prompt_tokens]``, ``[output_tokens]``, ``[method_weights]`` and one ``[[tenant]]``
    table per tenant (name, method, model)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read load-test config {path}: {err.strerror}") from err
    try:
        return LoadTestSpec(
            tenants=tuple(Tenant(**t) for t in raw["tenant"]),
            prompt=LengthDistribution(**raw.get("prompt_tokens", {})),
            output=LengthDistribution(**raw.get("output_tokens", {})),
            slo=Slo(**raw["slo"]),
            method_weights=raw.get("method_weights", {}),
            **raw.get("load", {}),
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: malformed load-test config ({err})") from err
