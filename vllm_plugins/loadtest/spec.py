"""What a load test sends: tenants per method, their popularity, request shapes and SLOs.

Read from a TOML file (``demo.toml`` beside this module is the example) by the package's config reader
(:mod:`vllm_plugins.config_reader`). Nothing heavier than pydantic, so that Locust's
gevent process imports little.
"""

from __future__ import annotations

import math
import random
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from vllm_plugins.config_reader import ConfigModel, read_config

METHODS = ("base", "lora", "fanlora", "iapt", "para", "milora")
"""One Locust user class per method, in this order."""
MAX_LENGTH = 1_000_000  # tokens: the most a prompt or output length may be drawn


def user_class_name(method: str) -> str:
    """The Locust user class of a method's tenants (:mod:`.locustfile`)."""
    return f"{method.title()}User"


class LengthDistribution(ConfigModel):
    """Token counts: ``lognormal`` (median ``median``, shape ``sigma``), ``uniform``
    (``low`` to ``high``) or ``fixed`` (``median``); always clipped to [low, high]."""

    kind: Literal["lognormal", "uniform", "fixed"] = "lognormal"
    median: float = Field(64, gt=0)
    sigma: float = Field(0.5, ge=0)
    low: int = Field(1, ge=1)
    high: int = Field(512, le=MAX_LENGTH)

    @model_validator(mode="after")
    def _ordered(self) -> LengthDistribution:
        if self.low > self.high:
            raise ValueError(f"length bounds must satisfy 1 <= low <= high, got {self.low}, {self.high}")
        return self

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            value = rng.uniform(self.low, self.high)
        elif self.kind == "fixed":
            value = self.median
        else:
            value = self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return int(min(self.high, max(self.low, round(value))))


class Tenant(ConfigModel):
    name: str = Field(min_length=1)
    method: Literal[METHODS]
    model: str  # the ``model`` field of its requests: its adapter, or the base model's name


class Slo(ConfigModel):
    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)


class LoadTestSpec(ConfigModel):
    tenants: tuple[Tenant, ...] = Field(min_length=1)
    prompt: LengthDistribution = LengthDistribution()
    output: LengthDistribution = LengthDistribution()
    slo: Slo
    zipf_exponent: float = Field(1.1, ge=0)
    users: int = Field(16, ge=1)
    spawn_rate: float = Field(16, gt=0)
    max_requests: int = Field(200, ge=1)
    run_time_s: int = Field(120, ge=1)
    request_timeout_s: float = Field(120, gt=0, le=86_400)
    seed: int = 0
    method_weights: dict[Literal[METHODS], Annotated[float, Field(ge=0, le=1_000)]] = {}
    words: tuple[str, ...] = ()  # set by the runner (the demo vocabulary), not read from TOML

    @model_validator(mode="after")
    def _distinct_tenants(self) -> LoadTestSpec:
        names = [t.name for t in self.tenants]
        if len(set(names)) < len(names):
            raise ValueError(f"tenant names must be distinct, got {sorted(n for n in set(names) if names.count(n) > 1)} twice")
        return self

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods with tenants, in :data:`METHODS` order."""
        present = {t.method for t in self.tenants}
        return tuple(m for m in METHODS if m in present)

    def tenants_of(self, method: str) -> tuple[Tenant, ...]:
        return tuple(t for t in self.tenants if t.method == method)

    def with_words(self, words: list[str]) -> LoadTestSpec:
        return self.model_copy(update={"words": tuple(words)})


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Popularity of ranks 1..count under Zipf's law: proportional to 1 / rank^exponent."""
    raw = [1.0 / rank**exponent for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def load_spec(path: Path) -> LoadTestSpec:
    """A load test from TOML: ``[load]`` (users, rates, bounds, seed), ``[slo]``,
    ``[prompt_tokens]``, ``[output_tokens]``, ``[method_weights]`` and one ``[[tenant]]``
    table per tenant (name, method, model). ValueError for an unreadable or bad file."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read load-test config {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not TOML ({err})") from err
    sections = {"tenant": "tenants", "prompt_tokens": "prompt", "output_tokens": "output", "slo": "slo",
                "method_weights": "method_weights"}
    values = {sections.get(key, key): value for key, value in raw.items() if key != "load"}
    if not isinstance(load := raw.get("load", {}), dict):
        raise ValueError(f"{path}: [load] must be a table")
    if "words" in values or "words" in load:
        raise ValueError(f"{path}: words: unknown key (the prompts' words are the demo vocabulary)")
    return read_config(LoadTestSpec, {**values, **load}, str(path))
