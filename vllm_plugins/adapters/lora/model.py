"""Build a PEFT LoRA model; its saved form is what vLLM's stock LoRA serving loads."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.common.model_parts import check_supported
from vllm_plugins.adapters.lora.config import LoraSettings


def peft_config(settings: LoraSettings) -> LoraConfig:
    """PEFT config; with a rank pattern, alpha follows the rank so alpha / r stays fixed."""
    scale = settings.alpha / settings.rank
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.placement or settings.target_modules),
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern={k: r * scale for k, r in settings.rank_pattern.items()},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_lora(base: nn.Module, settings: LoraSettings) -> PlainLM:
    check_supported(base)
    return PlainLM(get_peft_model(base, peft_config(settings)))
