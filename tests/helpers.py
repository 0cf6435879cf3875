"""Small helpers the tests share."""

from __future__ import annotations

import torch

from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.tasks import load_task
from vllm_plugins.training.data import collate, encode
from vllm_plugins.training.recipes import load_base


def task_batch(tokenizer, task: str = "reverse", n: int = 6):
    return collate(encode(tokenizer, load_task(task).train[:n]), tokenizer.pad_token_id)


def build(method: str, model_path, **overrides):
    """The untrained adapter of ``method`` over a fresh copy of the base model."""
    base, tokenizer = load_base(model_path)
    spec = METHODS[method]
    config = spec.config_cls(**overrides)
    return spec.build(base, config), base, tokenizer


def perturb(lm, seed: int = 0, scale: float = 0.5) -> None:
    """Move every trainable parameter away from its initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
