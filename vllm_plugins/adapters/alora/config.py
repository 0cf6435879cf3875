from __future__ import annotations

from pydantic import Field

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class AloraConfig:
    """ALoRA hyper-parameters (arXiv 2403.16187).

    rank: initial rank r0 of every module's LoRA; the total budget 7 * layers * r0 is
    conserved while ranks move between modules. alpha: the scaling is alpha / rank for every
    module, whatever its current rank. rounds: pruning / reallocation rounds after the
    initial training (the paper's "1 epoch" is the trainer's ``steps``). round_fraction:
    extra training per round, as a fraction of the initial training's steps (at least one
    step). score_batch: size of the one fixed validation batch that scores the ranks.
    """

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    rounds: int = Field(8, ge=0)
    round_fraction: float = Field(0.25, gt=0, le=1)
    score_batch: int = Field(32, ge=1)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.score_batch < 1:
            raise ValueError(f"rank and score_batch must be >= 1, got {self.rank} and {self.score_batch}")
        if self.rounds < 0 or self.round_fraction < 0:
            raise ValueError(f"rounds and round_fraction must be >= 0, got {self.rounds} and {self.round_fraction}")
