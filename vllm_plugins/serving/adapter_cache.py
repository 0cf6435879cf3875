"""Prompt-aware adapter weights held by a vLLM worker, at most ``capacity`` at once.

The front end validates an adapter before any request uses it and passes its directory
with the request; the worker loads it on first use and keeps the most recently used ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.storage import checkpoint_fingerprint, load_prompt_aware_layers


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    method: str
    layers: nn.ModuleList


class AdapterCache:
    def __init__(self, model_dir: str | Path, d: Dims, capacity: int):
        if capacity < 1:
            raise ValueError(f"the adapter capacity must be >= 1, got {capacity}")
        self.model_dir = model_dir
        self.dims = d
        self.capacity = capacity
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.loads = 0  # weight loads so far; more than the adapters named means reloads

    @cached_property
    def fingerprint(self) -> str:
        """The served checkpoint's fingerprint, read on the first adapter load only, so a
        server that never sees a prompt-aware request never reads its weights twice."""
        return checkpoint_fingerprint(self.model_dir)

    def get(self, name: str, path: str) -> LoadedAdapter:
        key = f"{name}@{path}"
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        layers, manifest = load_prompt_aware_layers(path, self.dims, self.fingerprint)
        adapter = LoadedAdapter(name=name, method=manifest["method"], layers=layers)
        self.loads += 1
        self._loaded[key] = adapter
        while len(self._loaded) > self.capacity:
            self._loaded.popitem(last=False)
        return adapter
