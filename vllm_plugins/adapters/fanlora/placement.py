"""FanLoRA's placement: which modules of which layers keep a LoRA.

A LoRA on every linear module is trained on a broad instruction mix (every tenant task's
training split). A module's importance is the rise of the loss on a fixed validation
batch when that module's LoRA alone is switched off (ablation, as ALoRA scores ranks):

    I(module) = L(adapter without module) - L(adapter)

Each layer keeps its ``modules_per_layer`` most important modules. The placement is then
used for every downstream tenant: fewer LoRA modules, less decode work.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from vllm_plugins.training.data import TrainBatch
from vllm_plugins.training.trainer import batch_loss


def _lora_layers(lm) -> dict[str, LoraLayer]:
    """PEFT LoRA layers by base-model module path (``model.layers.0.self_attn.q_proj``)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in lm.model.named_modules()
        if isinstance(module, LoraLayer)
    }


@torch.no_grad()
def module_importance(lm, batch: TrainBatch) -> dict[str, float]:
    """Ablation importance of every LoRA module of a trained all-module PEFT LoRA."""
    full = batch_loss(lm, batch).item()
    scores: dict[str, float] = {}
    for path, layer in _lora_layers(lm).items():
        weight = layer.lora_B["default"].weight
        saved = weight.clone()
        weight.zero_()
        scores[path] = batch_loss(lm, batch).item() - full
        weight.copy_(saved)
    return scores


def select_placement(scores: dict[str, float], modules_per_layer: int) -> tuple[str, ...]:
    """The ``modules_per_layer`` highest-scoring modules of each layer, in path order."""
    by_layer: dict[str, list[str]] = {}
    for path in scores:
        by_layer.setdefault(path.rsplit(".", 2)[0], []).append(path)
    kept = [
        path
        for paths in by_layer.values()
        for path in sorted(paths, key=lambda p: scores[p], reverse=True)[:modules_per_layer]
    ]
    return tuple(sorted(kept))
