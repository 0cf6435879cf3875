from __future__ import annotations

from torch import nn

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareModel
from vllm_plugins.adapters.iapt.config import IaptConfig
from vllm_plugins.adapters.iapt.layer import IaptLayer


def build_iapt(base: nn.Module, config: IaptConfig) -> PromptAwareModel:
    d = dims(base.config)
    layers = [IaptLayer(d, config.num_soft_tokens, config.bottleneck) for _ in range(d.num_layers)]
    return PromptAwareModel(base, layers)
