from __future__ import annotations

from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class MiloraConfig:
    """MiLoRA hyper-parameters.

    rank / alpha: each expert's LoRA (paper: rank 32). top_k: experts kept per layer and
    request (the paper uses both 1 and 3; 3 here). balance_weight: weight of the
    Switch-style load-balancing loss (paper: 1e-2).
    """

    rank: int = 8
    alpha: float = 16.0
    top_k: int = 3
    balance_weight: float = 1e-2
