from __future__ import annotations

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.para.config import ParaConfig
from vllm_plugins.adapters.para.layer import ParaLayer


def para_layers(d: Dims, config: ParaConfig) -> list[ParaLayer]:
    return [ParaLayer(d, config.bottleneck) for _ in range(d.num_layers)]
