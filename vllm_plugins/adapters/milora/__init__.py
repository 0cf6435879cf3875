"""MiLoRA: mixture of LoRA experts with prompt-aware routing (arXiv 2410.18035)."""

from vllm_plugins.adapters.milora.config import MiloraConfig
from vllm_plugins.adapters.milora.model import build_milora

__all__ = ["MiloraConfig", "build_milora"]
