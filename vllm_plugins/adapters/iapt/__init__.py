"""IAPT: Instruction-Aware Prompt Tuning (arXiv 2405.18203)."""

from vllm_plugins.adapters.iapt.config import IaptConfig
from vllm_plugins.adapters.iapt.model import iapt_layers

__all__ = ["IaptConfig", "iapt_layers"]
