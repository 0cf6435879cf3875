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

from pathlib import Path

import torch

from helpers import build
from vllm_plugins.adapters.common.rational import RationalActivation
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import describe_base, save_adapter
from vllm_plugins.training.recipes import load_base

SCALES = {"iapt": 0.3, "para": 0.3, "milora": 0.3, "lora": 0.3}


def save_random_adapter(method: str, model_path: Path, out: Path, seed: int) -> Path:
    base_info = describe_base(load_base(model_path)[0], model_path)
    lm, _, _ = build(method, model_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, RationalActivation):
                continue  # see the module docstring
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * SCALES[method])
    spec = METHODS[method]
    config = spec.config_cls()
    save_adapter(out, method, config, lm, base_info, lora_settings=config if spec.family == "lora" else None)
    return out


def reference_answers(model_path: Path, adapter_path: Path | None, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of the transformers reference: the base model, or it with an adapter."""
    from vllm_plugins.adapters.common.lm import PlainLM
    from vllm_plugins.adapters.storage import load_adapter
    from vllm_plugins.training.evaluate import generate_answers

    base, tokenizer = load_base(model_path)
    lm = PlainLM(base) if adapter_path is None else load_adapter(adapter_path, base)[0]
    return generate_answers(lm, tokenizer, prompts, max_new_tokens=max_tokens)


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
