"""The adapter trainer: AdamW on the adapter's parameters, loss on the answer tokens."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vllm_plugins.progress import Progress
from vllm_plugins.training.data import EncodedExample, collate


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
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
    """Train ``lm``'s trainable parameters for ``steps`` (default ``config.steps``) steps."""
    params = [p for p in lm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    steps = config.steps if steps is None else steps
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, min(20, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    progress = Progress(label, steps)
    started = time.monotonic()
    lm.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = collate(rng.sample(examples, min(config.batch_size, len(examples))), pad_id)
        loss = batch_loss(lm, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        progress.update(step + 1, f"loss {loss.item():.3f}")
    lm.eval()
    return {"train_seconds": time.monotonic() - started, "final_loss": float(loss.item())}
