"""PARA: Prompt Aware Representation Adjustment (arXiv 2502.01033)."""

from vllm_plugins.adapters.para.config import ParaConfig
from vllm_plugins.adapters.para.model import para_layers

__all__ = ["ParaConfig", "para_layers"]
