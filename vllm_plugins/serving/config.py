"""The plugins' settings, carried in vLLM's own ``--additional-config`` JSON::

    --additional-config '{"prompt_adapters": {"dir": "/srv/adapters", "max_active": 16,
                                              "max_rank": 16, "max_soft_tokens": 4,
                                              "max_adapters": 1024, "runtime_loading": false},
                          "kv_eviction": {"policy": "nacl", "keep_ratio": 0.2, "min_prompt": 1024}}'

``dir``: the adapter directory; every sub-directory holding a prompt-aware adapter is
registered at start under its directory name, and run-time loading accepts paths inside
it only. ``max_active``: prompt-aware adapters whose weights a worker holds at once.
``max_rank``: the highest MiLoRA expert rank a worker's stacked expert slots hold (as
vLLM's ``--max-lora-rank``). ``max_soft_tokens``: the most IAPT soft tokens per layer; the
pooling tables hold that many running sums of hidden size per request and layer.
Adapters above either are refused when registered. ``max_adapters``: the most
prompt-aware adapters registered at once. ``runtime_loading``: enables ``POST /v1/load_prompt_adapter`` and
``/v1/unload_prompt_adapter`` (off by default, as vLLM's run-time LoRA loading is).

``kv_eviction``: the server's default KV eviction (:mod:`vllm_plugins.eviction.settings`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from vllm_plugins.eviction import settings as eviction
from vllm_plugins.eviction.settings import EvictionSettings

SECTION = "prompt_adapters"


def read_section(additional_config, section: str, cls):
    """``cls`` (a dataclass) from one section of ``--additional-config`` (JSON text or a
    dict); defaults where the section is absent, an error for keys ``cls`` lacks."""
    if isinstance(additional_config, str):
        additional_config = json.loads(additional_config or "{}")
    values = (additional_config or {}).get(section) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(values) - known:
        raise ValueError(f"unknown {section} settings {sorted(unknown)} in --additional-config; known: {sorted(known)}")
    return cls(**values)


def eviction_settings(additional_config) -> EvictionSettings:
    settings = read_section(additional_config, eviction.SECTION, EvictionSettings)
    settings.validate()
    return settings


@dataclass(frozen=True)
class PromptAdapterSettings:
    dir: str | None = None
    max_active: int = 16
    max_rank: int = 16
    max_soft_tokens: int = 4
    max_adapters: int = 1024
    runtime_loading: bool = False

    def __post_init__(self) -> None:
        for name in ("max_active", "max_rank", "max_soft_tokens", "max_adapters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{SECTION}.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_additional_config(cls, additional_config) -> PromptAdapterSettings:
        return read_section(additional_config, SECTION, cls)
