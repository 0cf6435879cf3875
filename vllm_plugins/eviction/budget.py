"""How many of a prompt's tokens are kept, given vLLM's paged cache.

Kept tokens are compacted into the trailing slots of the prompt, so that the leading
blocks hold nothing still needed and go back to the block pool whole (vLLM frees blocks,
not tokens). The number kept is therefore the rule's budget rounded up until the
evicted part is a whole number of blocks: at most ``block_size - 1`` tokens more, at most
one block more than the budget alone would take. Every layer and KV head keeps that same
number (one block table serves them all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def plan_eviction(policy: str, num_prompt: int, budget: int, block_size: int, seed: int) -> EvictionPlan | None:
    """The plan keeping at least ``budget`` of ``num_prompt`` tokens, or None when no
    whole block would be freed."""
    evicted_blocks = max(0, num_prompt - budget) // block_size
    if evicted_blocks == 0:
        return None
    return EvictionPlan(policy, num_prompt, num_prompt - evicted_blocks * block_size, seed)
