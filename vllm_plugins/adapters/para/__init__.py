"""PARA: Prompt Aware Representation Adjustment (arXiv 2502.01033)."""

from vllm_plugins.adapters.para.config import ParaConfig
from vllm_plugins.adapters.para.model import build_para

__all__ = ["ParaConfig", "build_para"]
