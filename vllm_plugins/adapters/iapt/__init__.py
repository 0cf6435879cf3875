"""IAPT: Instruction-Aware Prompt Tuning (arXiv 2405.18203)."""

from vllm_plugins.adapters.iapt.config import IaptConfig
from vllm_plugins.adapters.iapt.model import build_iapt

__all__ = ["IaptConfig", "build_iapt"]
