from __future__ import annotations

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.milora.config import MiloraConfig
from vllm_plugins.adapters.milora.layer import MiloraLayer


def milora_layers(d: Dims, config: MiloraConfig) -> list[MiloraLayer]:
    return [
        MiloraLayer(d, config.rank, config.alpha, config.top_k, config.balance_weight)
        for _ in range(d.num_layers)
    ]
