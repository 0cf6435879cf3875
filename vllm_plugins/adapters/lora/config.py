from __future__ import annotations

from typing import Annotated

from pydantic import Field

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.config_reader import config_dataclass


@config_dataclass
class LoraSettings:
    """LoRA on ``target_modules`` of every layer, or on the explicit ``placement``.

    placement: full module paths (``model.layers.3.mlp.up_proj``) when LoRA sits on some
    modules of some layers only (FanLoRA). rank_pattern: per-module ranks (ALoRA); keys
    are module paths as in ``placement``.
    """

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: tuple[str, ...] = LINEAR_MODULES
    placement: tuple[str, ...] = ()
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
