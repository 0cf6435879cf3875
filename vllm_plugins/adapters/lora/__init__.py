"""Stock LoRA through the PEFT library: the baseline every method is measured against."""

from vllm_plugins.adapters.lora.config import LoraSettings
from vllm_plugins.adapters.lora.model import build_lora

__all__ = ["LoraSettings", "build_lora"]
