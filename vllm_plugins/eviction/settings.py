"""Which requests are evicted, with which policy and budget: server defaults and the
per-request ``vllm_xargs`` that override them.

Server (``vllm-plugins serve`` flags, carried in ``--additional-config``)::

    --kv-eviction nacl --kv-keep-ratio 0.2 [--kv-eviction-min-prompt 1024]
    --additional-config '{"kv_eviction": {"policy": "nacl", "keep_ratio": 0.2, "min_prompt": 1024}}'

Per request (``vllm_xargs``)::

    {"kv_eviction": "snapkv", "kv_keep_ratio": 0.1}   # or "kv_budget": 256 (tokens)
    {"kv_eviction": "none"}                          # this request keeps its whole cache

A request that names a policy is evicted whatever its length (as long as a whole KV block
is freed, :mod:`.budget`); the server's default acts only on prompts of at least
``min_prompt`` tokens. Keep ratio and budget are exclusive; with neither, the keep ratio
is 0.2 (NACL's reported setting).

Every policy always keeps some tokens, the prompt's last ones (its question; not expected
attention) and, for most, the attention sinks (:func:`.budget.min_budget`). A request's ``kv_budget`` below that
minimum is refused, with the minimum named; a keep ratio, and the server's own budget,
keep at least the minimum instead (the floor is in :func:`.budget.plan_eviction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import Field, model_validator

from vllm_plugins.config_reader import ConfigModel
from vllm_plugins.eviction.budget import min_budget
from vllm_plugins.eviction.policies import POLICIES

SECTION = "kv_eviction"
POLICY_ARG = "kv_eviction"
KEEP_RATIO_ARG = "kv_keep_ratio"
BUDGET_ARG = "kv_budget"
OFF = "none"
DEFAULT_KEEP_RATIO = 0.2


class EvictionSettingsError(ValueError):
    """A policy, ratio or budget that cannot be honoured (an HTTP 400 for a request)."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a refusal never echoes a whole request."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_amount(keep_ratio: object, budget: object) -> None:
    """Raises :class:`EvictionSettingsError` unless at most one of a keep ratio in (0, 1]
    and a budget of at least one token is given."""
    if keep_ratio is not None and budget is not None:
        raise EvictionSettingsError("give a keep ratio or a token budget, not both")
    if keep_ratio is not None and not (isinstance(keep_ratio, (int, float)) and not isinstance(keep_ratio, bool) and 0 < keep_ratio <= 1):
        raise EvictionSettingsError(f"the KV keep ratio must be in (0, 1], got {shown(keep_ratio)}")
    if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
        raise EvictionSettingsError(f"the KV budget must be a positive number of tokens, got {shown(budget)}")


@dataclass(frozen=True)
class EvictionRule:
    """A policy and how much of a prompt it keeps: a ratio of its tokens or a token budget."""

    policy: str
    keep_ratio: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise EvictionSettingsError(f"unknown KV eviction policy {shown(self.policy)}; known: {', '.join(sorted(POLICIES))}, {OFF}")
        check_amount(self.keep_ratio, self.budget)

    def tokens_to_keep(self, num_prompt: int) -> int:
        if self.budget is not None:
            return self.budget
        return math.ceil((DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio) * num_prompt)


class EvictionSettings(ConfigModel):
    """The server's default, off unless ``policy`` is set. A bad default is a ValueError
    when the settings are made (at start-up, not on the first request)."""

    policy: str | None = None
    keep_ratio: float | None = None
    budget: int | None = None
    min_prompt: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_default_rule(self) -> EvictionSettings:
        if self.default_rule() is None and (self.keep_ratio is not None or self.budget is not None):
            raise ValueError("a keep ratio or budget needs a policy (--kv-eviction)")
        return self

    def default_rule(self) -> EvictionRule | None:
        return None if self.policy in (None, OFF) else EvictionRule(self.policy, self.keep_ratio, self.budget)

    def rule_for(self, xargs: dict | None, num_prompt: int | None = None) -> EvictionRule | None:
        """The rule a request is evicted by, or None. ``xargs`` are its ``vllm_xargs``;
        with ``num_prompt`` (its prompt's tokens) the server default's ``min_prompt``
        applies, and a budget the request asked for is an error above the prompt or below
        the policy's :func:`~.budget.min_budget` (the message names that minimum). The
        server's own budget is no error on a shorter prompt: that prompt keeps all its
        tokens; nor below the minimum, which it then keeps (as a keep ratio does).

        Raises :class:`EvictionSettingsError` for a bad request setting."""
        xargs = xargs or {}
        if nulls := [key for key in (POLICY_ARG, KEEP_RATIO_ARG, BUDGET_ARG) if key in xargs and xargs[key] is None]:
            raise EvictionSettingsError(f"{', '.join(nulls)} cannot be null: leave the key out for the server's default")
        policy = xargs.get(POLICY_ARG)
        ratio, budget = xargs.get(KEEP_RATIO_ARG), xargs.get(BUDGET_ARG)
        if policy == OFF:  # no eviction; a ratio or budget beside it must still be one
            check_amount(ratio, budget)
            return None
        if policy is None:
            rule = self.default_rule()
            if rule is None:
                if ratio is not None or budget is not None:
                    raise EvictionSettingsError(f"{KEEP_RATIO_ARG}/{BUDGET_ARG} need a policy: set {POLICY_ARG} in vllm_xargs")
                return None
            if num_prompt is not None and num_prompt < self.min_prompt:
                return None
            policy = rule.policy
            if ratio is None and budget is None:
                ratio, budget = rule.keep_ratio, rule.budget
        elif not isinstance(policy, str):
            raise EvictionSettingsError(f"{POLICY_ARG} must be a policy name, got {shown(policy)}")
        rule = EvictionRule(policy, ratio, budget)
        asked = xargs.get(BUDGET_ARG)
        if asked is not None and num_prompt is not None:
            if asked > num_prompt:
                raise EvictionSettingsError(f"a KV budget of {asked} tokens is larger than the prompt ({num_prompt} tokens)")
            smallest = min_budget(rule.policy, num_prompt)
            if asked < smallest:
                recent = POLICIES[rule.policy]().recent_window(num_prompt)
                kept = [f"the prompt's last {recent} tokens, which hold the question"] if recent else []
                if smallest > recent:
                    kept.append(f"the prompt's first {smallest - recent} tokens, the attention sinks")
                raise EvictionSettingsError(
                    f"a KV budget of {asked} tokens is too small for {rule.policy} on a {num_prompt}-token prompt: "
                    f"the smallest budget is {smallest} ({rule.policy} always keeps {', and '.join(kept)})"
                )
        return rule
