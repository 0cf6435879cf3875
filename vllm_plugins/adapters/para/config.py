from __future__ import annotations

from pydantic import Field

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class ParaConfig:
    """PARA hyper-parameters.

    bottleneck: width of the vector generator's down-projection (the paper's very small
    bottleneck keeps the adapter at ~0.1% of the base model's parameters).
    """

    bottleneck: int = Field(16, ge=1)
