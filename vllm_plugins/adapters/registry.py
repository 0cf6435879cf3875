"""The adapter methods this project knows, by the name used on the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vllm_plugins.adapters.alora import AloraConfig
from vllm_plugins.adapters.fanlora import FanloraConfig
from vllm_plugins.adapters.common.model_parts import Dims, dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareLayer, PromptAwareModel
from vllm_plugins.adapters.iapt import IaptConfig, iapt_layers
from vllm_plugins.adapters.lora import LoraSettings, build_lora
from vllm_plugins.adapters.milora import MiloraConfig, milora_layers
from vllm_plugins.adapters.para import ParaConfig, para_layers
from vllm_plugins.config_reader import read_config


@dataclass(frozen=True)
class Method:
    """``family``: "prompt-aware" (state computed from the prompt, served by the plugin)
    or "lora" (a procedure that emits a PEFT LoRA, served by vLLM's stock LoRA).

    ``layers`` (prompt-aware only) builds the per-layer adapter modules from the base
    model's dimensions; ``build`` wraps a transformers base model.
    """

    name: str
    family: str
    config_cls: type
    build: Callable[[nn.Module, Any], nn.Module]
    layers: Callable[[Dims, Any], list[PromptAwareLayer]] | None = None

    def config_from_dict(self, values: dict) -> Any:
        """The method's configuration from a manifest's ``config``; ValueError if bad."""
        return read_config(self.config_cls, values, f"{self.name} config")

    @staticmethod
    def lora_settings_from_dict(values: dict) -> LoraSettings:
        """LoRA settings from a manifest's ``lora``; ValueError if bad."""
        return read_config(LoraSettings, values, "lora settings")


def _prompt_aware(name: str, config_cls: type, layers: Callable[[Dims, Any], list[PromptAwareLayer]]) -> Method:
    def build(base: nn.Module, config: Any) -> PromptAwareModel:
        return PromptAwareModel(base, layers(dims(base.config), config))

    return Method(name, "prompt-aware", config_cls, build, layers)


METHODS: dict[str, Method] = {
    "iapt": _prompt_aware("iapt", IaptConfig, iapt_layers),
    "para": _prompt_aware("para", ParaConfig, para_layers),
    "milora": _prompt_aware("milora", MiloraConfig, milora_layers),
    "lora": Method("lora", "lora", LoraSettings, build_lora),
    "fanlora": Method("fanlora", "lora", FanloraConfig, build_lora),
    "alora": Method("alora", "lora", AloraConfig, build_lora),
}
