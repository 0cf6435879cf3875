from __future__ import annotations

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class IaptConfig:
    """IAPT hyper-parameters (paper: 4 soft tokens, bottleneck 320 on a 7B model)."""

    num_soft_tokens: int = 4
    bottleneck: int = 64
