"""Adapter directories: save/load round trips and every refusal of the loader."""

import json

import pytest
import torch

from helpers import build, perturb, task_batch
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import (
    MANIFEST,
    AdapterError,
    describe_base,
    load_adapter,
    read_manifest,
    save_adapter,
)
from vllm_plugins.training.recipes import load_base

ROUND_TRIP = ["iapt", "para", "milora", "lora"]


def _logits(lm, batch):
    with torch.no_grad():
        return lm(batch.input_ids, batch.attention_mask, batch.pool_mask, batch.adapt_mask).logits


def _saved(method, model_path, out, **overrides):
    base_info = describe_base(load_base(model_path)[0], model_path)
    lm, _, tokenizer = build(method, model_path, **overrides)
    perturb(lm, scale=0.2)
    config = METHODS[method].config_cls(**overrides)
    lora = config if METHODS[method].family == "lora" else None
    save_adapter(out, method, config, lm, base_info, lora_settings=lora, task="reverse")
    return lm, tokenizer


@pytest.mark.parametrize("method", ROUND_TRIP)
def test_save_load_round_trip_gives_identical_outputs(method, tiny_model, tmp_path):
    lm, tokenizer = _saved(method, tiny_model, tmp_path / method)
    batch = task_batch(tokenizer)
    loaded, manifest = load_adapter(tmp_path / method, load_base(tiny_model)[0])
    assert manifest["method"] == method
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert torch.equal(_logits(loaded, batch), _logits(lm, batch))


@pytest.fixture
def saved_para(tiny_llama, tmp_path):
    _saved("para", tiny_llama, tmp_path / "para")
    return tmp_path / "para"


def _refusal(path, base) -> str:
    with pytest.raises(AdapterError) as err:
        load_adapter(path, base)
    return str(err.value)


def test_refuses_a_directory_without_manifest(tiny_llama, tmp_path):
    assert "adapter_manifest.json is missing" in _refusal(tmp_path, load_base(tiny_llama)[0])


def test_refuses_missing_weights(saved_para, tiny_llama):
    (saved_para / "adapter.safetensors").unlink()
    assert "is missing" in _refusal(saved_para, load_base(tiny_llama)[0])


def test_refuses_corrupt_weights(saved_para, tiny_llama):
    weights = saved_para / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "corrupt weights" in _refusal(saved_para, load_base(tiny_llama)[0])


def test_refuses_truncated_weights_even_with_a_matching_checksum(saved_para, tiny_llama):
    weights = saved_para / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    manifest = json.loads((saved_para / MANIFEST).read_text())
    import hashlib

    manifest["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (saved_para / MANIFEST).write_text(json.dumps(manifest))
    assert "corrupt weights" in _refusal(saved_para, load_base(tiny_llama)[0])


def test_refuses_shapes_that_do_not_fit(saved_para, tiny_llama):
    manifest = json.loads((saved_para / MANIFEST).read_text())
    manifest["config"]["bottleneck"] = 32  # the weights were trained with 16
    (saved_para / MANIFEST).write_text(json.dumps(manifest))
    message = _refusal(saved_para, load_base(tiny_llama)[0])
    assert "has shape" in message and "expects" in message


def test_refuses_an_unknown_method(saved_para, tiny_llama):
    manifest = json.loads((saved_para / MANIFEST).read_text())
    manifest["method"] = "prefix-magic"
    (saved_para / MANIFEST).write_text(json.dumps(manifest))
    assert "unknown method 'prefix-magic'" in _refusal(saved_para, load_base(tiny_llama)[0])


def test_refuses_another_base_model(saved_para, tiny_qwen2):
    assert "trained on another base model" in _refusal(saved_para, load_base(tiny_qwen2)[0])


def test_refuses_a_base_model_with_other_weights(saved_para, tiny_llama):
    base = load_base(tiny_llama)[0]
    with torch.no_grad():
        base.model.norm.weight.add_(1e-3)
    assert "trained on another base model" in _refusal(saved_para, base)


def test_manifest_names_method_config_and_base(saved_para, tiny_llama):
    manifest = read_manifest(saved_para)
    assert manifest["config"] == {"bottleneck": 16}
    assert manifest["base_model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["base_model"]["path"] == str(tiny_llama)


def test_checkpoint_fingerprint_equals_the_loaded_models(tiny_llama, tiny_qwen2):
    from vllm_plugins.adapters.storage import base_fingerprint, checkpoint_fingerprint

    assert checkpoint_fingerprint(tiny_llama) == base_fingerprint(load_base(tiny_llama)[0])
    assert checkpoint_fingerprint(tiny_llama) != checkpoint_fingerprint(tiny_qwen2)
