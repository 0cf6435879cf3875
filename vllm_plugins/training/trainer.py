"""The adapter trainer: the shared loop (:mod:`.loop`) on the adapter's parameters, loss on
the answer tokens."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vllm_plugins.training.data import EncodedExample, collate
from vllm_plugins.training.loop import fit


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    min_lr_rate: float = 0.05  # the cosine schedule (training/loop.py) ends at this fraction of learning_rate
    seed: int = 0


def batch_loss(lm, batch) -> torch.Tensor:
    """Cross-entropy on the answer tokens, plus any auxiliary loss the adapter adds."""
    out = lm(batch.input_ids, batch.attention_mask, batch.pool_mask, batch.adapt_mask)
    loss = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
    aux = lm.aux_loss()
    return loss if aux is None else loss + aux


def train_adapter(
    lm, examples: list[EncodedExample], pad_id: int, config: TrainConfig, label: str = "train", steps: int | None = None
) -> dict[str, float]:
    """Train ``lm``'s trainable parameters for ``steps`` (default ``config.steps``) steps
    on random batches of ``examples``; returns ``train_seconds`` and ``final_loss``.
    ValueError if ``lm`` has no trainable parameter."""
    params = [p for p in lm.parameters() if p.requires_grad]
    steps = config.steps if steps is None else steps
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)

    def step_loss(step: int) -> float:
        loss = batch_loss(lm, collate(rng.sample(examples, min(config.batch_size, len(examples))), pad_id))
        loss.backward()
        return loss.item()

    started = time.monotonic()
    losses = fit(lm, params, step_loss, steps, config.learning_rate, warmup_steps=min(20, steps // 10),
                 min_lr_rate=config.min_lr_rate, desc=label)
    return {"train_seconds": time.monotonic() - started, "final_loss": losses[-1] if losses else float("nan")}
