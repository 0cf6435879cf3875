"""Train one method on one tenant task and write its adapter directory.

Adapters are cached under ``$VLLM_PLUGINS_HOME/adapters/<base fingerprint>/<method>-<task>``;
a directory whose manifest matches the method's current configuration is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_plugins import paths
from vllm_plugins.adapters.alora import AloraConfig, train_alora
from vllm_plugins.adapters.fanlora import FanloraConfig, module_importance, select_placement
from vllm_plugins.adapters.lora import LoraSettings, build_lora
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import AdapterError, base_fingerprint, describe_base, read_manifest, save_adapter
from vllm_plugins.tasks import load_task, task_names
from vllm_plugins.training.data import collate, encode
from vllm_plugins.training.trainer import TrainConfig, train_adapter

logger = logging.getLogger(__name__)

TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "iapt": TrainConfig(steps=300, learning_rate=3e-3),
    "para": TrainConfig(steps=300, learning_rate=3e-3),
    "milora": TrainConfig(steps=300, learning_rate=3e-3),
    "lora": TrainConfig(steps=300, learning_rate=3e-3),
    "fanlora": TrainConfig(steps=300, learning_rate=3e-3),
    "alora": TrainConfig(steps=150, learning_rate=3e-3),  # plus 8 rounds of 0.25 x 150
}


@dataclass(frozen=True)
class Trained:
    path: Path
    manifest: dict


def load_base(base_path: str | Path):
    """The frozen base model (eval mode) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()
    return model, tokenizer


def count_trainable(lm) -> int:
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def _digest(*parts: Any) -> str:
    blob = json.dumps([dataclasses.asdict(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def fanlora_placement(base_path: str | Path, config: FanloraConfig, train: TrainConfig) -> tuple[str, ...]:
    """Train an all-module LoRA on every task's mix, score modules, keep the best per layer.

    Cached per base model and configuration: every FanLoRA tenant shares one placement.
    """
    base, tokenizer = load_base(base_path)
    cache = paths.home() / "placements" / f"fanlora-{base_fingerprint(base)[7:19]}-{_digest(config, train)}.json"
    if cache.is_file():
        return tuple(json.loads(cache.read_text())["placement"])
    mix = [ex for name in task_names() for ex in encode(tokenizer, load_task(name).train)]
    dev = [ex for name in task_names() for ex in encode(tokenizer, load_task(name).dev[:8])]
    lm = build_lora(base, LoraSettings(rank=config.rank, alpha=config.alpha))
    train_adapter(lm, mix, tokenizer.pad_token_id, train, label="fanlora-placement", steps=config.broad_steps)
    scores = module_importance(lm, collate(dev, tokenizer.pad_token_id))
    placement = select_placement(scores, config.modules_per_layer)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"placement": placement, "scores": scores}, indent=2))
    logger.info(f"placement: {len(placement)} of {len(scores)} modules")
    return placement


def _differences(manifest: dict, method: str, task: str, config, base_info: dict, train_config: TrainConfig) -> list[str]:
    """What an adapter's manifest names that the request does not, as "<what> <found>
    (asked: <wanted>)"; none if the adapter is the one asked for."""
    wanted = {"method": method, "task": task, "configuration": json.loads(json.dumps(dataclasses.asdict(config))),
              "base model": base_info["fingerprint"], "training steps": train_config.steps}
    base, metrics = manifest.get("base_model"), manifest.get("metrics")
    found = {"method": manifest.get("method"), "task": manifest.get("task"), "configuration": manifest.get("config"),
             "base model": base.get("fingerprint") if isinstance(base, dict) else base,
             "training steps": metrics.get("train_steps") if isinstance(metrics, dict) else None}
    return [f"{key} {found[key]!r} (asked: {wanted[key]!r})" for key in wanted if found[key] != wanted[key]]


def train_method(
    method: str, task: str, base_path: str | Path, out: str | Path | None = None, steps: int | None = None
) -> Trained:
    """Train (or reuse) the adapter of ``method`` for ``task`` over the base model.

    An adapter already in ``out`` is reused only if its manifest names the same method,
    task, configuration, base model and training steps; if it names others, raises
    ValueError and leaves it untouched (``out`` given) or trains again (the cache's own
    path)."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    spec = METHODS[method]
    train_config = TRAIN_CONFIGS[method]
    if steps is not None:
        train_config = dataclasses.replace(train_config, steps=steps)
    config = spec.config_cls()
    base, tokenizer = load_base(base_path)
    base_info = describe_base(base, base_path)
    chosen_by_caller = out is not None
    if out is None:
        out = paths.adapters_dir() / base_info["fingerprint"][7:19] / f"{method}-{task}-{_digest(config, train_config)}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is not a directory: choose another --out")
    try:
        manifest = read_manifest(out)
    except AdapterError:
        manifest = None
    if manifest is not None:
        differ = _differences(manifest, method, task, config, base_info, train_config)
        if not differ:
            return Trained(out, manifest)
        if chosen_by_caller:
            raise ValueError(f"{out} holds another adapter ({', '.join(differ)}): choose another --out or remove it")
        # else this module's own cache, written by another version: trained again below
    elif chosen_by_caller and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no adapter manifest this version can read: "
                         "choose another --out or remove it")
    splits = load_task(task)
    train = encode(tokenizer, splits.train)
    label = f"train {method}/{task}"
    lora_settings = None
    if method == "alora":
        dev = encode(tokenizer, splits.dev)
        lm, lora_settings, report = train_alora(base, train, dev, tokenizer.pad_token_id, AloraConfig(), train_config)
    else:
        if method == "fanlora":
            placement = fanlora_placement(base_path, config, train_config)
            lora_settings = LoraSettings(rank=config.rank, alpha=config.alpha, placement=placement)
            lm = build_lora(base, lora_settings)
        else:
            lm = spec.build(base, config)
            if spec.family == "lora":
                lora_settings = config
        report = train_adapter(lm, train, tokenizer.pad_token_id, train_config, label=label)
    metrics = {
        "trainable_parameters": count_trainable(lm),
        "train_seconds": round(report["train_seconds"], 1),
        "final_loss": report["final_loss"],
        "train_steps": train_config.steps,
    }
    save_adapter(out, method, config, lm, base_info, lora_settings=lora_settings, task=task, metrics=metrics)
    return Trained(out, read_manifest(out))
