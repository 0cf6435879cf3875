from __future__ import annotations

from pydantic import Field

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class MiloraConfig:
    """MiLoRA hyper-parameters.

    rank / alpha: each expert's LoRA (paper: rank 32). top_k: experts kept per layer and
    request (the paper uses both 1 and 3; 3 here). balance_weight: weight of the
    Switch-style load-balancing loss (paper: 1e-2).
    """

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    top_k: int = Field(3, ge=1)
    balance_weight: float = Field(1e-2, ge=0)
