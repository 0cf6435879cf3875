from __future__ import annotations

from torch import nn

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareModel
from vllm_plugins.adapters.milora.config import MiloraConfig
from vllm_plugins.adapters.milora.layer import MiloraLayer


def build_milora(base: nn.Module, config: MiloraConfig) -> PromptAwareModel:
    d = dims(base.config)
    layers = [MiloraLayer(d, config.rank, config.alpha, config.top_k, config.balance_weight) for _ in range(d.num_layers)]
    return PromptAwareModel(base, layers)
