"""IAPT, PARA and MiLoRA over transformers models (Llama and Qwen2)."""

import pytest
import torch

from helpers import build, perturb, task_batch
from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.training.data import encode_prompt
from vllm_plugins.training.generation import greedy_generate

PROMPT_AWARE = ["iapt", "para", "milora"]


def _logits(lm, batch):
    return lm(batch.input_ids, batch.attention_mask, batch.pool_mask, batch.adapt_mask).logits


@pytest.mark.parametrize("method", PROMPT_AWARE)
def test_untrained_adapter_is_the_identity(method, tiny_model):
    lm, base, tokenizer = build(method, tiny_model)
    batch = task_batch(tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        adapted = _logits(lm, batch)
        assert torch.equal(adapted, base_logits)
        perturb(lm)  # the comparison above is sensitive: a trained adapter changes logits
        assert not torch.allclose(_logits(lm, batch), base_logits, atol=1e-3)


@pytest.mark.parametrize("method", PROMPT_AWARE)
def test_adapter_acts_only_on_adapted_positions(method, tiny_llama):
    lm, base, tokenizer = build(method, tiny_llama)
    perturb(lm)
    batch = task_batch(tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        adapted = _logits(lm, batch)
    before = ~batch.adapt_mask & batch.pool_mask  # prompt tokens before the last one
    assert torch.allclose(adapted[before], base_logits[before], atol=1e-5)
    assert not torch.allclose(adapted[batch.adapt_mask], base_logits[batch.adapt_mask], atol=1e-3)


@pytest.mark.parametrize("method", PROMPT_AWARE)
def test_state_is_computed_once_at_prefill(method, tiny_llama):
    lm, _, tokenizer = build(method, tiny_llama)
    perturb(lm)
    calls = []
    for layer in lm.adapter_layers:
        original = layer.compute_state
        layer.compute_state = lambda h, m, _orig=original: calls.append(h.shape) or _orig(h, m)
    prompts = [encode_prompt(tokenizer, "a b c d ="), encode_prompt(tokenizer, "q w =")]
    out = greedy_generate(lm, prompts, 6, eos_id=-1, pad_id=tokenizer.pad_token_id)
    assert all(len(o) == 6 for o in out)  # six decode steps ran
    assert len(calls) == len(lm.adapter_layers)  # one state per layer, all at prefill
    assert all(shape[1] == max(map(len, prompts)) for shape in calls)


def test_milora_experts_are_fixed_after_the_prompt(tiny_llama):
    lm, _, tokenizer = build("milora", tiny_llama, top_k=2)
    perturb(lm, scale=2.0)
    prompts = [encode_prompt(tokenizer, p) for p in ("a b c =", "z y x w v =", "m =")]
    chosen_per_step = []
    for layer_state_hook in lm.adapter_layers[0].experts.values():
        layer_state_hook.register_forward_hook(
            lambda *_: chosen_per_step.append(lm.runtime.states[0].chosen.clone())
        )
    greedy_generate(lm, prompts, 5, eos_id=-1, pad_id=tokenizer.pad_token_id)
    assert len(chosen_per_step) >= 7 * 5  # prefill and four decode passes
    first = chosen_per_step[0]
    assert first.shape == (3, 2)
    assert all(torch.equal(c, first) for c in chosen_per_step)


def test_greedy_generation_does_not_depend_on_batch_composition(tiny_llama):
    lm, _, tokenizer = build("para", tiny_llama)
    perturb(lm)
    prompts = [encode_prompt(tokenizer, p) for p in ("a b c =", "z y x w v u =", "m n =")]
    pad = tokenizer.pad_token_id
    together = greedy_generate(lm, prompts, 6, eos_id=-1, pad_id=pad)
    alone = [greedy_generate(lm, [p], 6, eos_id=-1, pad_id=pad)[0] for p in prompts]
    assert together == alone


def test_plain_model_ignores_masks(tiny_llama):
    _, base, tokenizer = build("para", tiny_llama)
    batch = task_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(
            _logits(PlainLM(base), batch),
            base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
        )
