"""The front end's table of prompt-aware adapters: name -> validated directory.

Adapters are validated here, before any request can name them: the manifest, the weights,
their shapes against the served model, the base-model fingerprint and the server's limits
(:func:`~vllm_plugins.adapters.storage.load_prompt_aware_layers`). Run-time registration
accepts directories inside the configured adapter directory only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.adapters.storage import AdapterError, checkpoint_fingerprint, load_prompt_aware_layers, read_manifest
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.methods import check_limits


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    path: str
    method: str


class PromptAdapterRegistry:
    def __init__(self, model_dir: str, settings: PromptAdapterSettings):
        self.dims = dims(AutoConfig.from_pretrained(model_dir))
        self.settings = settings
        adapter_dir = settings.dir
        self.fingerprint = checkpoint_fingerprint(model_dir)
        self.root = Path(adapter_dir).resolve() if adapter_dir else None
        self.adapters: dict[str, RegisteredAdapter] = {}
        if self.root is not None:
            for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
                if METHODS[read_manifest(sub)["method"]].family == "prompt-aware":
                    self.register(sub.name, str(sub))

    def register(self, name: str, path: str) -> RegisteredAdapter:
        if not name or "/" in name:
            raise AdapterError(f"invalid adapter name {name!r}")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        resolved = Path(path).resolve()
        if self.root is None or not resolved.is_relative_to(self.root):
            raise AdapterError(f"{path} is outside the allowed adapter directory {self.root}")
        layers, manifest = load_prompt_aware_layers(resolved, self.dims, self.fingerprint)
        check_limits(manifest["method"], layers, self.dims, self.settings)
        adapter = RegisteredAdapter(name=name, path=str(resolved), method=manifest["method"])
        self.adapters[name] = adapter
        return adapter

    def unregister(self, name: str) -> None:
        del self.adapters[name]
