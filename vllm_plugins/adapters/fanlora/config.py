from __future__ import annotations

from pydantic import Field

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class FanloraConfig:
    """FanLoRA hyper-parameters.

    modules_per_layer: how many of a layer's seven linear modules keep a LoRA.
    broad_steps: training steps of the all-module LoRA on the broad instruction mix whose
    ablation scores decide the placement. rank / alpha: the LoRA of the kept modules.
    """

    modules_per_layer: int = Field(2, ge=1)
    broad_steps: int = Field(400, ge=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
