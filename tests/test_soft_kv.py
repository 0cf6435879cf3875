"""Slots for IAPT's soft tokens in KV blocks of a (stand-in) vLLM block pool."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vllm_plugins.serving.soft_kv import SoftTokenSlots


@dataclass
class Block:
    block_id: int


class BlockPool:
    """The three BlockPool methods SoftTokenSlots uses, over ``n`` blocks."""

    def __init__(self, n: int):
        self.free = [Block(i) for i in range(n)]

    def get_num_free_blocks(self) -> int:
        return len(self.free)

    def get_new_blocks(self, n: int) -> list[Block]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def free_blocks(self, blocks) -> None:
        self.free += list(blocks)


def test_requests_share_a_block_and_it_returns_when_the_last_one_frees():
    pool = BlockPool(2)
    slots = SoftTokenSlots(pool, block_size=16)
    runs = [slots.allocate(4) for _ in range(4)]  # 16 slots: exactly one block
    assert {tuple(r[1:]) for r in runs} == {(0, 4), (4, 4), (8, 4), (12, 4)}
    assert len({r[0] for r in runs}) == 1 and pool.get_num_free_blocks() == 1
    fifth = slots.allocate(4)
    assert fifth[0] != runs[0][0] and pool.get_num_free_blocks() == 0
    assert slots.allocate(4)[0] == fifth[0]  # the second block has room for more
    for r in runs:
        slots.free(r)
    assert pool.get_num_free_blocks() == 1  # the first block went back to the pool


def test_an_empty_pool_makes_the_request_wait_and_oversized_runs_are_refused():
    slots = SoftTokenSlots(BlockPool(1), block_size=8)
    assert slots.allocate(8) is not None
    assert slots.allocate(8) is None
    with pytest.raises(ValueError, match="do not fit"):
        slots.allocate(9)
