from __future__ import annotations

from torch import nn

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareModel
from vllm_plugins.adapters.para.config import ParaConfig
from vllm_plugins.adapters.para.layer import ParaLayer


def build_para(base: nn.Module, config: ParaConfig) -> PromptAwareModel:
    d = dims(base.config)
    return PromptAwareModel(base, [ParaLayer(d, config.bottleneck) for _ in range(d.num_layers)])
