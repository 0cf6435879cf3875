"""The prompt-aware methods as served in vLLM: per-request tables, stacked adapter weights
and the per-token work at a decoder layer's module sites; the adapter math itself lives in
``vllm_plugins/adapters/<method>/``."""

from vllm_plugins.serving.methods.base import SITES, LayerModules, ServedMethod
from vllm_plugins.serving.methods.iapt import IaptMethod
from vllm_plugins.serving.methods.milora import MiloraMethod
from vllm_plugins.serving.methods.para import ParaMethod

METHODS: tuple[type[ServedMethod], ...] = (IaptMethod, ParaMethod, MiloraMethod)
"""In the order of their ``code``."""


def check_limits(method: str, config, d, settings) -> None:
    """Raise :class:`~vllm_plugins.adapters.storage.AdapterError` if the server's limits
    (``settings``) cannot hold an adapter of ``method`` with ``config``."""
    from vllm_plugins.adapters.storage import AdapterError

    reason = next(m for m in METHODS if m.name == method).check(config, d, settings)
    if reason is not None:
        raise AdapterError(reason)


__all__ = ["METHODS", "SITES", "LayerModules", "ServedMethod", "check_limits"]
