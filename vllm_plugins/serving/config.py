"""The plugin's settings, carried in vLLM's own ``--additional-config`` JSON::

    --additional-config '{"prompt_adapters": {"dir": "/srv/adapters", "max_active": 16,
                                              "runtime_loading": false}}'

``dir``: the adapter directory; every sub-directory holding a prompt-aware adapter is
registered at start under its directory name, and run-time loading accepts paths inside
it only. ``max_active``: prompt-aware adapters whose weights a worker holds at once.
``runtime_loading``: enables ``POST /v1/load_prompt_adapter`` and
``/v1/unload_prompt_adapter`` (off by default, as vLLM's run-time LoRA loading is).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

SECTION = "prompt_adapters"


@dataclass(frozen=True)
class PromptAdapterSettings:
    dir: str | None = None
    max_active: int = 16
    runtime_loading: bool = False

    @classmethod
    def from_additional_config(cls, additional_config) -> PromptAdapterSettings:
        if isinstance(additional_config, str):
            additional_config = json.loads(additional_config or "{}")
        section = (additional_config or {}).get(SECTION) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown {SECTION} settings {sorted(unknown)} in --additional-config; known: {sorted(known)}")
        settings = cls(**section)
        if settings.max_active < 1:
            raise ValueError(f"{SECTION}.max_active must be >= 1, got {settings.max_active}")
        return settings
