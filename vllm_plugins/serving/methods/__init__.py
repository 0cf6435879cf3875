"""The prompt-aware methods as served in vLLM: per-request tables, stacked adapter weights
and the per-token work at a decoder layer's module sites; the adapter math itself lives in
``vllm_plugins/adapters/<method>/``."""

from vllm_plugins.serving.methods.base import SITES, LayerModules, Limits, ServedMethod
from vllm_plugins.serving.methods.iapt import IaptMethod
from vllm_plugins.serving.methods.milora import MiloraMethod
from vllm_plugins.serving.methods.para import ParaMethod

METHODS: tuple[type[ServedMethod], ...] = (IaptMethod, ParaMethod, MiloraMethod)
"""In the order of their ``code``."""

__all__ = ["METHODS", "SITES", "LayerModules", "Limits", "ServedMethod"]
