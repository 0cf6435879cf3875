"""Random-initialised Llama checkpoints for latency benchmarks (latency needs no trained
weights), cached under ``$VLLM_PLUGINS_HOME/bench/models/<name>``."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_plugins import paths

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RandomLlama:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 1024

    @property
    def path(self) -> Path:
        return paths.home() / "bench" / "models" / self.name

    def num_parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        return self.layers * (attention + mlp + norms) + 2 * self.vocab * self.hidden + self.hidden


LLAMA_125M = RandomLlama("llama-125m", hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000)
LLAMA_TINY = RandomLlama("llama-tiny", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512)


def build_random_llama(spec: RandomLlama, seed: int = 0) -> Path:
    """Write (once) a float32 Llama checkpoint with transformers' default initialisation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = spec.path
    if (out / "config.json").exists():
        return out
    logger.info(f"building random {spec.name} ({spec.num_parameters() / 1e6:.0f}M parameters) in {out}")
    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out
