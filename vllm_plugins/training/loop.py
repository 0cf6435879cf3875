"""The one training loop, shared by the adapter trainer (:mod:`.trainer`) and the demo
base model's build (:mod:`vllm_plugins.demo_model.build`): AdamW, a transformers LR
schedule, gradient norm clipped to 1, a progress bar."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from transformers import get_scheduler

from vllm_plugins.logs import progress_bar

logger = logging.getLogger(__name__)


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    step_loss: Callable[[int], float],
    steps: int,
    learning_rate: float,
    warmup_steps: int,
    min_lr_rate: float,
    weight_decay: float = 0.0,
    desc: str = "train",
) -> list[float]:
    """Train ``params`` of ``model`` for ``steps`` AdamW steps; returns each step's loss.

    ``step_loss(step)`` computes the step's loss, calls ``backward`` on it (once, or once
    per micro-batch) and returns its value. The learning rate follows transformers'
    ``cosine_with_min_lr`` schedule: linear warm-up over ``warmup_steps`` from 0, then a
    cosine from ``learning_rate`` down to ``min_lr_rate * learning_rate``. ``model`` is in
    train mode during the loop and in eval mode after. ValueError if ``params`` is empty.
    """
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=steps, scheduler_specific_kwargs={"min_lr_rate": min_lr_rate})
    losses: list[float] = []
    model.train()
    with progress_bar(logger, steps, desc) as bar:
        for step in range(steps):
            losses.append(step_loss(step))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    model.eval()
    return losses
