"""Random prompt-aware adapters held in memory, for timing at any model size.

A server reads each adapter from a validated snapshot directory. At Llama-3-8B size a
MiLoRA adapter's experts alone are 84 MB in float32, so a thousand of them neither fit a
disk nor a minute; the decode step does not depend on their values either. So the
benchmark gives the runtime a reader (:class:`~vllm_plugins.serving.adapter_slots.AdapterSlots`'
``read``) that serves adapters named ``memory:<method>/<index>`` from ``generators``
random adapters per method, adapter ``index`` sharing generator ``index % generators``.
The runtime loads each named adapter into a slot of its own as it loads any adapter (for
MiLoRA: its experts copied into the slot's stacked weights), so the slots hold distinct
copies and a step reads as many distinct weights as it names adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.common.rational import RationalActivation
from vllm_plugins.adapters.registry import METHODS

PREFIX = "memory:"


def adapter_path(method: str, index: int) -> str:
    return f"{PREFIX}{method}/{index}"


class MemoryAdapters:
    def __init__(self, d: Dims, methods: tuple[str, ...], generators: int, seed: int, scale: float = 0.02):
        """``generators`` random adapters of each of ``methods`` (prompt-aware), each of
        their trained parameters moved by ``scale`` times a standard normal away from its
        initialisation (rational activations keep their GeLU fit), on the CPU in float32
        (the runtime moves an adapter to the model's device when it loads it)."""
        gen = torch.Generator().manual_seed(seed)
        self.adapters: dict[str, list[nn.ModuleList]] = {}
        for method in methods:
            spec = METHODS[method]
            config = spec.config_cls()
            self.adapters[method] = []
            for _ in range(generators):
                layers = nn.ModuleList(spec.layers(d, config))
                with torch.no_grad():
                    for module in layers.modules():
                        if not isinstance(module, RationalActivation):
                            for param in module.parameters(recurse=False):
                                param.add_(torch.randn(param.shape, generator=gen) * scale)
                self.adapters[method].append(layers.eval().requires_grad_(False))

    def read(self, path: str) -> tuple[nn.ModuleList, dict]:
        """The runtime's reader: ``memory:<method>/<index>`` -> (layers, manifest).
        ValueError for another path."""
        method, _, index = path.removeprefix(PREFIX).partition("/")
        if not path.startswith(PREFIX) or method not in self.adapters or not index.isdigit():
            raise ValueError(f"{path!r} names no adapter held in memory")
        generators = self.adapters[method]
        return generators[int(index) % len(generators)], {"method": method}
