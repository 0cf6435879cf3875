"""How each prompt-aware method acts on vLLM's fused modules, for a flat batch of tokens.

An applier finalises a request's state from its pooled prompt and applies states at the
module sites of a vLLM decoder layer (``qkv``, ``attention``, ``o_proj``, ``gate_up``,
``down``); the adapter math itself lives in ``vllm_plugins/adapters/<method>/``.
"""

from vllm_plugins.serving.methods.base import Applier, LayerModules
from vllm_plugins.serving.methods.iapt import IaptApplier
from vllm_plugins.serving.methods.milora import MiloraApplier
from vllm_plugins.serving.methods.para import ParaApplier

APPLIERS: dict[str, Applier] = {a.method: a for a in (IaptApplier(), ParaApplier(), MiloraApplier())}

__all__ = ["APPLIERS", "Applier", "LayerModules"]
