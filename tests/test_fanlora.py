"""FanLoRA: ablation importance of each LoRA module, the per-layer placement it chooses,
the placement shared (cached) by every tenant, and adapters that carry LoRA only there."""

from __future__ import annotations

import pytest
import torch

from helpers import build, perturb, task_batch
from vllm_plugins.adapters.common.model_parts import ATTENTION_MODULES, MLP_MODULES
from vllm_plugins.adapters.fanlora import FanloraConfig, module_importance, select_placement
from vllm_plugins.adapters.lora import LoraSettings, build_lora
from vllm_plugins.adapters.storage import describe_base, load_adapter, save_adapter
from vllm_plugins.training import recipes
from vllm_plugins.training.recipes import fanlora_placement, load_base
from vllm_plugins.training.trainer import TrainConfig, batch_loss

MODULES = [("self_attn", m) for m in ATTENTION_MODULES] + [("mlp", m) for m in MLP_MODULES]


def _lora_paths(lm) -> set[str]:
    return {name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
            for name, _ in lm.model.named_modules() if name.endswith("lora_A.default")}


def test_importance_is_the_loss_rise_when_one_modules_lora_is_switched_off(tiny_llama):
    lm, base, tokenizer = build("lora", tiny_llama)
    perturb(lm, seed=3, scale=0.3)
    batch = task_batch(tokenizer)
    with torch.no_grad():
        full = batch_loss(lm, batch).item()
        scores = module_importance(lm, batch)
        assert batch_loss(lm, batch).item() == full  # every module's weights are put back
    layers = base.config.num_hidden_layers
    assert len(scores) == 7 * layers
    path = "model.layers.1.mlp.up_proj"
    layer = dict(lm.model.named_modules())[f"base_model.model.{path}"]
    with torch.no_grad():
        saved = layer.lora_B["default"].weight.clone()
        layer.lora_B["default"].weight.zero_()
        without = batch_loss(lm, batch).item()
        layer.lora_B["default"].weight.copy_(saved)
    assert scores[path] == pytest.approx(without - full, abs=1e-6)
    assert len(set(scores.values())) > 1


def test_placement_keeps_each_layers_best_modules():
    scores = {f"model.layers.{i}.{group}.{m}": float((7 * i + j) % 5 + j / 10)
              for i in range(3) for j, (group, m) in enumerate(MODULES)}
    kept = select_placement(scores, 2)
    assert kept == tuple(sorted(kept)) and len(kept) == 6
    for i in range(3):
        mine = {p: s for p, s in scores.items() if p.startswith(f"model.layers.{i}.")}
        best = sorted(mine, key=mine.get, reverse=True)[:2]
        assert {p for p in kept if p.startswith(f"model.layers.{i}.")} == set(best)
    assert select_placement(scores, 0) == ()
    assert select_placement(scores, 9) == tuple(sorted(scores))


def test_every_tenant_shares_one_cached_placement(tiny_llama, monkeypatch):
    config, train = FanloraConfig(modules_per_layer=2, broad_steps=3), TrainConfig(steps=3, batch_size=4)
    placement = fanlora_placement(tiny_llama, config, train)
    layers = load_base(tiny_llama)[0].config.num_hidden_layers
    assert len(placement) == 2 * layers
    assert all(sum(p.startswith(f"model.layers.{i}.") for p in placement) == 2 for i in range(layers))

    def no_training(*args, **kwargs):
        raise AssertionError("the placement was trained again")

    monkeypatch.setattr(recipes, "train_adapter", no_training)
    assert fanlora_placement(tiny_llama, config, train) == placement


def test_a_fanlora_adapter_has_lora_on_its_placement_only_and_round_trips(tiny_llama, tmp_path):
    placement = ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    settings = LoraSettings(rank=4, alpha=8.0, placement=placement)
    base, tokenizer = load_base(tiny_llama)
    base_info = describe_base(base, tiny_llama)  # before LoRA is injected into it
    lm = build_lora(base, settings)
    assert _lora_paths(lm) == set(placement)
    perturb(lm, seed=5, scale=0.3)
    batch = task_batch(tokenizer)
    with torch.no_grad():
        expected = lm(batch.input_ids, batch.attention_mask).logits
    save_adapter(tmp_path / "fan", "fanlora", FanloraConfig(rank=4, alpha=8.0), lm, base_info,
                 lora_settings=settings)
    loaded, manifest = load_adapter(tmp_path / "fan", load_base(tiny_llama)[0])
    assert tuple(manifest["lora"]["placement"]) == placement and _lora_paths(loaded) == set(placement)
    with torch.no_grad():
        assert torch.equal(loaded(batch.input_ids, batch.attention_mask).logits, expected)
