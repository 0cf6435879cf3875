"""Adapters and reference answers for serving tests.

Adapters have random (not trained) weights, saved as real adapter directories: parity
needs the same weights on both sides, not good ones. The weights are moved far enough
from their identity initialisation that every adapter changes the greedy tokens, and no
further: parity compares greedy tokens, so an adapter must not turn float noise between two
correct implementations into changed tokens. Rational activations keep their GeLU fit
(random coefficients of order 1 make a degree-6 numerator a sum of large terms of both
signs). With IAPT moved by 1.0 and its rational coefficients moved too, 1e-6 of noise came
out as up to 7e-3 in served log-probs against the reference, and a near-tie flipped; as
here, at most 1e-5.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from helpers import build
from vllm_plugins.adapters.alora import AloraConfig
from vllm_plugins.adapters.alora.allocation import settings_for
from vllm_plugins.adapters.common.model_parts import ATTENTION_MODULES, LINEAR_MODULES
from vllm_plugins.adapters.common.rational import RationalActivation
from vllm_plugins.adapters.fanlora import FanloraConfig
from vllm_plugins.adapters.lora import LoraSettings, build_lora
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import describe_base, save_adapter
from vllm_plugins.training.recipes import load_base

SCALES = {"iapt": 0.3, "para": 0.3, "milora": 0.3, "lora": 0.3, "fanlora": 0.3, "alora": 0.3}
ALORA_RANKS = (0, 2, 4, 8, 16)  # 0: the module was pruned; above the initial rank 8: it gained rank


def _module_paths(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{'self_attn' if m in ATTENTION_MODULES else 'mlp'}.{m}"
            for i in range(num_layers) for m in LINEAR_MODULES]


def lora_settings(method: str, num_layers: int, seed: int) -> LoraSettings:
    """What a LoRA-family procedure would emit, chosen at random: stock LoRA on every
    module, FanLoRA on ``modules_per_layer`` modules of each layer, ALoRA with a rank per
    module (some pruned, some above the initial rank)."""
    rng = random.Random(seed)
    paths = _module_paths(num_layers)
    if method == "fanlora":
        config = FanloraConfig()
        per_layer = [paths[i:i + len(LINEAR_MODULES)] for i in range(0, len(paths), len(LINEAR_MODULES))]
        placement = tuple(sorted(p for layer in per_layer for p in rng.sample(layer, config.modules_per_layer)))
        return LoraSettings(rank=config.rank, alpha=config.alpha, placement=placement)
    if method == "alora":
        return settings_for({path: rng.choice(ALORA_RANKS) for path in paths}, AloraConfig())
    return LoraSettings()


def save_random_adapter(method: str, model_path: Path, out: Path, seed: int) -> Path:
    base, _ = load_base(model_path)
    base_info = describe_base(base, model_path)
    spec = METHODS[method]
    config = spec.config_cls()
    settings = None
    if spec.family == "lora":
        settings = lora_settings(method, base.config.num_hidden_layers, seed)
        lm = build_lora(base, settings)
    else:
        lm, _, _ = build(method, model_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, RationalActivation):
                continue  # see the module docstring
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * SCALES[method])
    save_adapter(out, method, config, lm, base_info, lora_settings=settings)
    return out


def reference_answers(model_path: Path, adapter_path: Path | None, prompts: list[str], max_tokens: int,
                      margins: list[float] | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Greedy answers of the transformers reference: the base model, or it with an adapter,
    computed in ``dtype``; ``margins`` gets each answer's smallest logit gap
    (``greedy_decode``)."""
    from vllm_plugins.adapters.common.lm import PlainLM
    from vllm_plugins.adapters.storage import load_adapter
    from vllm_plugins.training.evaluate import generate_answers

    base, tokenizer = load_base(model_path)
    lm = PlainLM(base) if adapter_path is None else load_adapter(adapter_path, base)[0]
    return generate_answers(lm.to(dtype), tokenizer, prompts, max_new_tokens=max_tokens, margins=margins)


def reference_prompt_logprobs(model_path: Path, adapter_path: Path | None, token_ids: list[int]) -> list[float]:
    """The transformers reference's log-probability of each prompt token after the first,
    given the tokens before it: the base model, or it with an adapter."""
    from vllm_plugins.adapters.common.lm import PlainLM
    from vllm_plugins.adapters.storage import load_adapter

    base, _ = load_base(model_path)
    lm = PlainLM(base) if adapter_path is None else load_adapter(adapter_path, base)[0]
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        logits = lm(ids, torch.ones_like(ids)).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0].tolist()


def scale_weights(adapter_dir: Path, factor: float) -> Path:
    """Multiply every weight of a saved adapter by ``factor`` (finite), manifest checksum
    updated: an adapter that passes every check but overflows the activations."""
    import json

    from safetensors.torch import load_file, save_file

    from vllm_plugins.adapters.storage import MANIFEST, file_sha256

    weights = adapter_dir / "adapter.safetensors"
    save_file({k: v * factor for k, v in load_file(weights).items()}, weights)
    manifest = json.loads((adapter_dir / MANIFEST).read_text())
    manifest["weights"]["sha256"] = file_sha256(weights)
    (adapter_dir / MANIFEST).write_text(json.dumps(manifest))
    return adapter_dir
