"""The prompt-aware adapters a vLLM worker holds: ``max_active`` slots.

The front end validates an adapter before any request names it and passes its directory
with the request; the worker loads it into a slot when a step first needs it, and the
methods write the weights their per-token work reads into their stacked slot tensors
(:meth:`~.methods.base.ServedMethod.load`), once. A slot is reused for another adapter
only when no request of the current step uses it, least recently used first; the
scheduler admits at most ``max_active`` adapters among running requests, so a step never
needs more slots than there are.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.storage import checkpoint_fingerprint, load_prompt_aware_layers

ReadAdapter = Callable[[str], tuple[nn.ModuleList, dict]]
"""An adapter's path -> its per-layer modules and its manifest (``method`` at least)."""


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    method: str
    layers: nn.ModuleList
    slot: int


class AdapterSlots:
    def __init__(self, model_dir: str | Path, d: Dims, capacity: int,
                 on_load: Callable[[int, str, nn.ModuleList], None], check: Callable[[str, object], None],
                 device: torch.device | str = "cpu", read: ReadAdapter | None = None):
        """``on_load(slot, method, layers)`` writes an adapter's weights into its slot;
        ``check(method, config)`` raises for an adapter the worker's tables cannot hold;
        ``device``: where the adapters' modules run (the prefill's); ``read``: how a path
        becomes an adapter, by default :meth:`read_snapshot` (the decode-step harness
        reads adapters it holds in memory)."""
        if capacity < 1:
            raise ValueError(f"the adapter capacity must be >= 1, got {capacity}")
        self.model_dir = model_dir
        self.dims = d
        self.capacity = capacity
        self.device = torch.device(device)
        self._on_load = on_load
        self._check = check
        self._read = read or self.read_snapshot
        self._resident: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self.loads = 0  # weight loads so far; more than the adapters named means reloads

    @cached_property
    def fingerprint(self) -> str:
        """The served checkpoint's fingerprint, read on the first adapter load only, so a
        server that never sees a prompt-aware request never reads its weights twice."""
        return checkpoint_fingerprint(self.model_dir)

    def activate(self, adapters: list[tuple[str, str]]) -> dict[tuple[str, str], LoadedAdapter]:
        """Make the step's (name, directory) adapters resident; returns each one's slot."""
        wanted = {f"{name}@{path}": (name, path) for name, path in dict.fromkeys(adapters)}
        if len(wanted) > self.capacity:
            raise RuntimeError(f"a step names {len(wanted)} prompt-aware adapters; the worker holds {self.capacity}")
        for key in wanted:
            if key in self._resident:
                self._resident.move_to_end(key)
        for key, (name, path) in wanted.items():
            if key not in self._resident:
                self._resident[key] = self._load(name, path, self._free_slot(wanted))
        return {wanted[key]: self._resident[key] for key in wanted}

    def _free_slot(self, wanted: dict) -> int:
        taken = {adapter.slot for adapter in self._resident.values()}
        free = [slot for slot in range(self.capacity) if slot not in taken]
        if free:
            return free[0]
        oldest = next(key for key in self._resident if key not in wanted)
        return self._resident.pop(oldest).slot

    def in_slot(self, slot: int) -> LoadedAdapter:
        """The adapter resident in ``slot``; ``KeyError`` if the slot is empty."""
        for adapter in self._resident.values():
            if adapter.slot == slot:
                return adapter
        raise KeyError(f"no prompt-aware adapter is resident in slot {slot}")

    def read_snapshot(self, path: str) -> tuple[nn.ModuleList, dict]:
        """A validated snapshot directory's adapter, checked against the served checkpoint
        and the worker's limits; raises AdapterError."""
        return load_prompt_aware_layers(path, self.dims, self.fingerprint, self._check)

    def _load(self, name: str, path: str, slot: int) -> LoadedAdapter:
        layers, manifest = self._read(path)
        layers = layers.to(self.device)
        self._on_load(slot, manifest["method"], layers)
        self.loads += 1
        return LoadedAdapter(name=name, method=manifest["method"], layers=layers, slot=slot)
