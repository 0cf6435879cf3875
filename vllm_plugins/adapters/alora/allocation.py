"""ALoRA's rank allocation (arXiv 2403.16187, Sec. 3.2-3.3) and its export to PEFT LoRA.

AB-LoRA importance of rank i, scored on ONE fixed validation batch, S(M) = -loss(M):

    IS(i) = S(M_i) - S(M_\\i)

M_i keeps rank i as the only active rank in the whole adapter (every other rank of every
module switched off); M_\\i keeps every active rank except i. The scores here are centred:

    IS(i) - [S(M_0) - S(M)] = [S(M_i) - S(M_0)] + [S(M) - S(M_\\i)]

with M_0 the base model (no active rank) and M the full adapter. The shift is the same for
every rank, so the ranks pruned and the modules that receive ranks are the paper's, and a
rank that changes nothing (a zero B column) scores exactly 0.

Allocation (Algorithm 1): train the gated super-network for the trainer's ``steps`` (the
paper's first epoch), then for up to ``rounds`` rounds:

1. score every active rank;
2. prune the n_A lowest-scoring ranks of the whole model, n_A = 7 the number of module
   types (a module left with rank 0 leaves the placement);
3. add n_A new ranks, one each to the modules that lost no rank this round, in the order of
   the mean score of their ranks (highest first, round-robin if fewer than n_A modules);
4. train ``round(round_fraction * steps)`` more steps.

It stops early when no module keeps all its ranks, i.e. pruned ranks have nowhere to go.
The result is exported as an ordinary PEFT LoRA with a per-module ``rank_pattern``.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import torch
from torch import nn

from vllm_plugins.adapters.alora.config import AloraConfig
from vllm_plugins.adapters.alora.gated_lora import GatedLoraModel
from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.adapters.lora import LoraSettings, build_lora
from vllm_plugins.training.data import EncodedExample, TrainBatch, collate
from vllm_plugins.training.trainer import TrainConfig, batch_loss, train_adapter

RankId = tuple[int, int]  # (index into GatedLoraModel.loras, slot)


def validation_batch(dev_examples: list[EncodedExample], pad_id: int, size: int, seed: int) -> TrainBatch:
    """The one fixed batch every score of the run is measured on."""
    return collate(random.Random(seed).sample(dev_examples, min(size, len(dev_examples))), pad_id)


def _score(model: GatedLoraModel, batch: TrainBatch) -> float:
    """S = minus the loss on the validation batch."""
    return -batch_loss(model, batch).item()


@torch.no_grad()
def importance_scores(model: GatedLoraModel, batch: TrainBatch) -> dict[RankId, float]:
    """Centred AB-LoRA score of every active rank (see the module docstring)."""
    model.eval()
    saved = [lora.gate.clone() for lora in model.loras]
    active = [(m, slot) for m, lora in enumerate(model.loras) for slot in lora.active_slots()]
    full = _score(model, batch)
    for lora in model.loras:
        lora.gate.zero_()
    empty = _score(model, batch)
    alone: dict[RankId, float] = {}
    for m, slot in active:
        model.loras[m].gate[slot] = 1.0
        alone[(m, slot)] = _score(model, batch) - empty
        model.loras[m].gate[slot] = 0.0
    for lora, gate in zip(model.loras, saved):
        lora.gate.copy_(gate)
    scores: dict[RankId, float] = {}
    for m, slot in active:
        model.loras[m].gate[slot] = 0.0
        scores[(m, slot)] = alone[(m, slot)] + full - _score(model, batch)
        model.loras[m].gate[slot] = 1.0
    return scores


def lowest_ranks(scores: dict[RankId, float], count: int) -> list[RankId]:
    """The ``count`` least important ranks of the whole model."""
    return sorted(scores, key=scores.__getitem__)[:count]


def receiving_modules(scores: dict[RankId, float], pruned: list[RankId], count: int) -> list[int]:
    """``count`` modules to grow by one rank each: those that lost none, highest mean score first."""
    lost = {m for m, _ in pruned}
    per_module: dict[int, list[float]] = {}
    for (m, _), score in scores.items():
        if m not in lost:
            per_module.setdefault(m, []).append(score)
    order = sorted(per_module, key=lambda m: sum(per_module[m]) / len(per_module[m]), reverse=True)
    return [order[k % len(order)] for k in range(count)] if order else []


def reallocate(model: GatedLoraModel, batch: TrainBatch, count: int) -> int:
    """One round of pruning and reallocation; the number of ranks moved (0: nothing to prune)."""
    scores = importance_scores(model, batch)
    pruned = lowest_ranks(scores, count)
    receivers = receiving_modules(scores, pruned, len(pruned))
    if not receivers:
        return 0
    for m, slot in pruned:
        model.loras[m].prune(slot)
    for m in receivers:
        model.loras[m].add_rank()
    return len(pruned)


def settings_for(ranks: dict[str, int], config: AloraConfig) -> LoraSettings:
    """PEFT LoRA settings placing the modules with rank > 0 at their ranks."""
    kept = {path: rank for path, rank in ranks.items() if rank > 0}
    return LoraSettings(rank=config.rank, alpha=config.alpha, placement=tuple(kept), rank_pattern=kept)


def export_peft(model: GatedLoraModel, config: AloraConfig) -> tuple[PlainLM, LoraSettings]:
    """A PEFT LoRA on ``model``'s base with the active ranks' A rows and B columns.

    The gated hooks are removed first: PEFT wraps the same base modules. Its scaling
    alpha_m / r_m = alpha / rank (``alpha_pattern``) equals the gated model's.
    """
    model.remove_hooks()
    settings = settings_for(model.ranks(), config)
    lm = build_lora(model.model, settings)
    params: dict[str, nn.Parameter] = dict(lm.model.named_parameters())
    with torch.no_grad():
        for path, lora in zip(model.paths, model.loras):
            slots = lora.active_slots()
            if slots:
                params[f"base_model.model.{path}.lora_A.default.weight"].copy_(lora.lora_A[slots])
                params[f"base_model.model.{path}.lora_B.default.weight"].copy_(lora.lora_B[:, slots])
    return lm, settings


def train_alora(
    base: nn.Module,
    examples: list[EncodedExample],
    dev_examples: list[EncodedExample],
    pad_id: int,
    config: AloraConfig,
    train_config: TrainConfig,
) -> tuple[PlainLM, LoraSettings, dict]:
    """Train ALoRA on ``base`` and return the PEFT LoRA, its settings and a report.

    The report holds ``train_seconds`` (the whole procedure, scoring included),
    ``final_loss`` (last training step), ``ranks`` (module path -> rank, 0 for dropped
    modules) and ``pruned_per_round``.
    """
    started = time.monotonic()
    model = GatedLoraModel(base, config.rank, config.alpha)
    batch = validation_batch(dev_examples, pad_id, config.score_batch, train_config.seed)
    stats = train_adapter(model, examples, pad_id, train_config, label="alora")
    extra_steps = max(1, round(config.round_fraction * train_config.steps))
    pruned_per_round: list[int] = []
    for index in range(1, config.rounds + 1):
        moved = reallocate(model, batch, len(LINEAR_MODULES))
        if not moved:
            break
        pruned_per_round.append(moved)
        round_config = replace(train_config, seed=train_config.seed + index)
        stats = train_adapter(model, examples, pad_id, round_config, label=f"alora round {index}", steps=extra_steps)
    ranks = model.ranks()
    lm, settings = export_peft(model, config)
    report = {
        "train_seconds": time.monotonic() - started,
        "final_loss": stats["final_loss"],
        "ranks": ranks,
        "pruned_per_round": pruned_per_round,
    }
    return lm, settings, report
