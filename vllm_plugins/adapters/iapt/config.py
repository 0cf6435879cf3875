from __future__ import annotations

from pydantic import Field

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class IaptConfig:
    """IAPT hyper-parameters (paper: 4 soft tokens, bottleneck 320 on a 7B model)."""

    num_soft_tokens: int = Field(4, ge=1)
    bottleneck: int = Field(64, ge=1)
