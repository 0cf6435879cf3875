"""MiLoRA: mixture of LoRA experts with prompt-aware routing (arXiv 2410.18035)."""

from vllm_plugins.adapters.milora.config import MiloraConfig
from vllm_plugins.adapters.milora.model import milora_layers

__all__ = ["MiloraConfig", "milora_layers"]
