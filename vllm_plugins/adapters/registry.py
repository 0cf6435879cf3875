"""The adapter methods this project knows, by the name used on the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vllm_plugins.adapters.alora import AloraConfig
from vllm_plugins.adapters.fanlora import FanloraConfig
from vllm_plugins.adapters.iapt import IaptConfig, build_iapt
from vllm_plugins.adapters.lora import LoraSettings, build_lora
from vllm_plugins.adapters.milora import MiloraConfig, build_milora
from vllm_plugins.adapters.para import ParaConfig, build_para


@dataclass(frozen=True)
class Method:
    """``family``: "prompt-aware" (state computed from the prompt, served by the plugin)
    or "lora" (a procedure that emits a PEFT LoRA, served by vLLM's stock LoRA)."""

    name: str
    family: str
    config_cls: type
    build: Callable[[nn.Module, Any], nn.Module]

    def config_from_dict(self, values: dict) -> Any:
        return _dataclass_from_dict(self.config_cls, values)

    @staticmethod
    def lora_settings_from_dict(values: dict) -> LoraSettings:
        return _dataclass_from_dict(LoraSettings, values)


def _dataclass_from_dict(cls: type, values: dict) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise KeyError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    tuples = {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}
    return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})


METHODS: dict[str, Method] = {
    "iapt": Method("iapt", "prompt-aware", IaptConfig, build_iapt),
    "para": Method("para", "prompt-aware", ParaConfig, build_para),
    "milora": Method("milora", "prompt-aware", MiloraConfig, build_milora),
    "lora": Method("lora", "lora", LoraSettings, build_lora),
    "fanlora": Method("fanlora", "lora", FanloraConfig, build_lora),
    "alora": Method("alora", "lora", AloraConfig, build_lora),
}
