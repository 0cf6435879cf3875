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

import json

from pydantic import Field

from vllm_plugins.config_reader import ConfigModel, read_config
from vllm_plugins.eviction import settings as eviction
from vllm_plugins.eviction.settings import EvictionSettings

SECTION = "prompt_adapters"


def read_section(additional_config, section: str, cls: type[ConfigModel]):
    """``cls`` from one section of ``--additional-config`` (JSON text or a dict); defaults
    where the section is absent. ValueError for unknown keys or bad values."""
    if isinstance(additional_config, str):
        try:
            additional_config = json.loads(additional_config or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"--additional-config is not JSON ({err})") from None
    additional_config = additional_config or {}
    if not isinstance(additional_config, dict):
        raise ValueError(f"--additional-config must be a JSON object, got {type(additional_config).__name__}")
    values = additional_config.get(section)
    return read_config(cls, {} if values is None else values, f"--additional-config {section}")


def eviction_settings(additional_config) -> EvictionSettings:
    return read_section(additional_config, eviction.SECTION, EvictionSettings)


class PromptAdapterSettings(ConfigModel):
    dir: str | None = None
    max_active: int = Field(16, ge=1, le=1024)
    max_rank: int = Field(16, ge=1, le=512)  # vLLM's largest --max-lora-rank
    max_soft_tokens: int = Field(4, ge=1, le=256)
    max_adapters: int = Field(1024, ge=1, le=1_000_000)
    runtime_loading: bool = False

    @classmethod
    def from_additional_config(cls, additional_config) -> PromptAdapterSettings:
        return read_section(additional_config, SECTION, cls)
