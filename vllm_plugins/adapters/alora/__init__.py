"""ALoRA: allocating low-rank adaptation (arXiv 2403.16187), exported as a PEFT LoRA with per-module ranks."""

from vllm_plugins.adapters.alora.allocation import train_alora
from vllm_plugins.adapters.alora.config import AloraConfig

__all__ = ["AloraConfig", "train_alora"]
