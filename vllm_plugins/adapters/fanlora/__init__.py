"""FanLoRA: LoRA on the most important modules only (EMNLP 2024 industry track)."""

from vllm_plugins.adapters.fanlora.config import FanloraConfig
from vllm_plugins.adapters.fanlora.placement import module_importance, select_placement

__all__ = ["FanloraConfig", "module_importance", "select_placement"]
