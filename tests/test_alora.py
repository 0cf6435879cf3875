"""ALoRA (arXiv 2403.16187): gated super-network, AB-LoRA scores, allocation, PEFT export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_plugins.adapters.alora import AloraConfig, train_alora
from vllm_plugins.adapters.alora.allocation import export_peft, importance_scores, validation_batch
from vllm_plugins.adapters.alora.gated_lora import GatedLoraModel
from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES
from vllm_plugins.tasks import load_task
from vllm_plugins.training.data import EncodedExample, collate, encode
from vllm_plugins.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def model_dir(tiny_llama: Path) -> Path:
    """The tiny demo model (conftest's: built once per run, whichever worker asks first)."""
    return tiny_llama


@pytest.fixture()
def base(model_dir: Path) -> torch.nn.Module:
    """A fresh base model per test: PEFT export wraps the base's modules in place."""
    return AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reverse(tokenizer) -> tuple[list[EncodedExample], list[EncodedExample]]:
    task = load_task("reverse")
    return encode(tokenizer, task.train[:200]), encode(tokenizer, task.dev[:32])


@torch.no_grad()
def _randomize_b(model: GatedLoraModel, seed: int = 0) -> None:
    """Non-zero B everywhere, so every rank changes the model's output."""
    generator = torch.Generator().manual_seed(seed)
    for lora in model.loras:
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=generator) * 0.05)


def test_export_matches_gated_logits(base, tokenizer, reverse):
    batch = collate(reverse[1][:8], tokenizer.pad_token_id)
    with torch.no_grad():
        base_logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    model = GatedLoraModel(base, rank=4, alpha=8.0)
    model.loras[0].prune(1)
    model.loras[0].prune(3)
    for slot in range(4):
        model.loras[6].prune(slot)
    model.loras[6].add_rank()  # reuses a free slot
    model.loras[6].prune(0)
    model.loras[9].add_rank()  # appends a fifth slot
    model.eval()
    _randomize_b(model)
    with torch.no_grad():
        gated = model(batch.input_ids, batch.attention_mask).logits
    lm, settings = export_peft(model, AloraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        exported = lm(batch.input_ids, batch.attention_mask).logits

    assert (gated - base_logits).abs().max() > 1e-2
    assert model.paths[6] not in settings.placement
    assert settings.rank_pattern[model.paths[0]] == 2 and settings.rank_pattern[model.paths[9]] == 5
    torch.testing.assert_close(exported, gated, atol=1e-5, rtol=0)


def test_short_run_conserves_budget(base, tokenizer, reverse):
    config = AloraConfig(rounds=2, score_batch=8)
    train_config = TrainConfig(steps=10, batch_size=8)
    lm, settings, report = train_alora(base, *reverse, tokenizer.pad_token_id, config, train_config)
    ranks = report["ranks"]

    assert report["pruned_per_round"] == [len(LINEAR_MODULES)] * 2
    assert len(ranks) == len(LINEAR_MODULES) * base.config.num_hidden_layers
    assert sum(ranks.values()) == len(ranks) * config.rank
    assert any(rank != config.rank for rank in ranks.values())
    assert settings.rank_pattern == {path: rank for path, rank in ranks.items() if rank > 0}
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in lm.model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert set(layers) == set(settings.rank_pattern)
    for path, rank in settings.rank_pattern.items():
        assert layers[path].lora_A["default"].weight.shape[0] == rank
        assert layers[path].lora_B["default"].weight.shape[1] == rank
        assert layers[path].scaling["default"] == pytest.approx(config.alpha / config.rank)


def test_zero_b_column_scores_exactly_zero(base, tokenizer, reverse):
    model = GatedLoraModel(base, rank=4, alpha=8.0)
    _randomize_b(model)
    with torch.no_grad():
        model.loras[5].lora_B[:, 2] = 0.0
    batch = validation_batch(reverse[1], tokenizer.pad_token_id, size=8, seed=0)
    scores = importance_scores(model, batch)

    assert len(scores) == len(model.loras) * 4
    assert scores[(5, 2)] == 0.0
    assert scores[(5, 1)] != 0.0
    assert all(bool(lora.gate.eq(1).all()) for lora in model.loras)
