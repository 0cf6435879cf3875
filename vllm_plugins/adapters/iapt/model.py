from __future__ import annotations

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.iapt.config import IaptConfig
from vllm_plugins.adapters.iapt.layer import IaptLayer


def iapt_layers(d: Dims, config: IaptConfig) -> list[IaptLayer]:
    return [IaptLayer(d, config.num_soft_tokens, config.bottleneck) for _ in range(d.num_layers)]
