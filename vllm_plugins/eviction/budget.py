"""How many of a prompt's tokens are kept, given vLLM's paged cache.

Kept tokens are compacted into the trailing slots of the prompt, so that the leading
blocks hold nothing still needed and go back to the block pool whole (vLLM frees blocks,
not tokens). The number kept is therefore the rule's budget rounded up until the
evicted part is a whole number of blocks: at most ``block_size - 1`` tokens more, at most
one block more than the budget alone would take. Every layer and KV head keeps that same
number (one block table serves them all).

A plan never keeps fewer tokens than its policy protects (:func:`min_budget`: the
prompt's last tokens, which hold its question, and the attention sinks; expected
attention's sinks only), whatever the
rule asked: this is the floor for the server's own default rule and a request's keep
ratio. A request's token budget below it is refused before it gets here
(:meth:`vllm_plugins.eviction.settings.EvictionSettings.rule_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_plugins.eviction.policies import POLICIES


@dataclass(frozen=True)
class EvictionPlan:
    """What happens to one request's prompt at the end of its prefill."""

    policy: str
    num_prompt: int
    num_kept: int
    seed: int

    @property
    def num_evicted(self) -> int:
        return self.num_prompt - self.num_kept

    def evicted_blocks(self, block_size: int) -> int:
        return self.num_evicted // block_size

    def generator(self) -> torch.Generator:
        """The randomness of the policy's choice, seeded by the request: a choice is
        reproducible and independent of the batch the request is in."""
        return torch.Generator().manual_seed(self.seed)

    def as_args(self) -> list:
        return [self.policy, self.num_prompt, self.num_kept, self.seed]

    @classmethod
    def from_args(cls, args: list) -> EvictionPlan:
        return cls(*args)


def min_budget(policy: str, num_prompt: int) -> int:
    """The fewest of ``num_prompt`` tokens ``policy`` may keep: the tokens it protects
    (:meth:`~vllm_plugins.eviction.policies.base.EvictionPolicy.protected_tokens`)."""
    return len(POLICIES[policy]().protected_tokens(num_prompt))


def plan_eviction(policy: str, num_prompt: int, budget: int, block_size: int, seed: int) -> EvictionPlan | None:
    """The plan keeping at least ``budget`` of ``num_prompt`` tokens, and never fewer than
    :func:`min_budget`, or None when no whole block would be freed."""
    budget = max(budget, min_budget(policy, num_prompt))
    evicted_blocks = max(0, num_prompt - budget) // block_size
    if evicted_blocks == 0:
        return None
    return EvictionPlan(policy, num_prompt, num_prompt - evicted_blocks * block_size, seed)
