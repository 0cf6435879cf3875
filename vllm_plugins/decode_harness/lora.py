"""Stock LoRA in the harness, applied the way vLLM applies it.

vLLM wraps a LoRA-enabled model's ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and
``down_proj`` in LoRA layers that run the base layer and then add every token's adapter
through the punica wrapper, from weights stacked per adapter slot; the plugins' layers
wrap those (``PromptAwareLinear(LoRA layer(base))``). Here:

* :class:`LoraMapping` is the punica wrapper's per-step state: each token's slot in a
  persistent buffer and, on CUDA, vLLM's own kernel metadata (``LoRAKernelMeta``) built
  from it before the step;
* :class:`LoraLinear` is a LoRA layer: on CUDA it launches vLLM's shrink and expand
  Triton kernels (:func:`~vllm_plugins.bench.vllm_lora.add_lora_linear`, carried where
  vLLM is not installed); elsewhere it adds the same math in plain torch
  (:func:`~vllm_plugins.bench.vllm_lora.lora_delta_torch`);
* the weights are :class:`~vllm_plugins.bench.vllm_lora.VllmLoraLayer` banks, one per
  decoder layer, in vLLM's stacked layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from vllm_plugins.adapters.common.model_parts import ATTENTION_MODULES, LINEAR_MODULES
from vllm_plugins.bench.vllm_lora import (SITES, VllmLoraLayer, add_lora_linear, captured_lora_counts,
                                          check_kernel_dtype, load_vllm_lora_ops, lora_delta_torch)

_SITE_PATHS = {"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_up_proj",
               "down_proj": "mlp.down_proj"}


class LoraMapping:
    """The step's token -> LoRA slot map (-1: none) for ``num_slots`` slots."""

    def __init__(self, num_slots: int, max_tokens: int, device: torch.device | str, specialize_active_lora: bool = False):
        """``specialize_active_lora``: vLLM's LoRAConfig option; False (vLLM's default)
        launches the kernels over every slot, True over the step's active adapters only."""
        self.device = torch.device(device)
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)
        self.specialize_active_lora = specialize_active_lora
        self.ops = self.meta = None
        if self.device.type == "cuda":
            self.ops = load_vllm_lora_ops()
            self.meta = self.ops.LoRAKernelMeta.make(
                num_slots, max_tokens, device=self.device,
                captured_lora_counts=captured_lora_counts(num_slots, specialize_active_lora))

    def update(self, slots: np.ndarray) -> None:
        """The step's (tokens,) slots, before its forward pass (outside a captured graph)."""
        n = len(slots)
        self.token_slots.fill_(-1)
        self.token_slots[:n] = torch.from_numpy(slots.astype(np.int32))
        if self.meta is not None:
            self.meta.prepare_tensors(self.token_slots[:n])

    def add(self, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
            lora_b: tuple[torch.Tensor, ...]) -> None:
        """Add each token's LoRA delta to ``y`` (tokens, sum(out)) in place; ``x`` (tokens, in)."""
        n = x.shape[0]
        if self.meta is None:
            y += lora_delta_torch(x, lora_a, lora_b, self.token_slots[:n]).to(y.dtype)
            return
        rank = lora_b[0].shape[-1]
        buffer = torch.empty((len(lora_b), n, rank), dtype=torch.float32, device=x.device)  # as add_lora_linear does
        add_lora_linear(self.ops, self.meta.meta_args(n, self.specialize_active_lora), y, x, lora_a, lora_b, buffer)


class LoraLinear(nn.Module):
    """A linear layer with stock LoRA: the base layer, then the step's adapters."""

    def __init__(self, base_layer: nn.Module, mapping: LoraMapping, lora_a: tuple[torch.Tensor, ...],
                 lora_b: tuple[torch.Tensor, ...]):
        super().__init__()
        self.base_layer = base_layer
        self.mapping = mapping
        self.lora_a, self.lora_b = lora_a, lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        self.mapping.add(y, x, self.lora_a, self.lora_b)
        return y


def make_banks(model: nn.Module, rank: int, num_slots: int, seed: int) -> list[VllmLoraLayer]:
    """One bank of ``num_slots`` random rank-``rank`` LoRA slots per decoder layer, in the
    model's dtype and device. ValueError on CUDA for a dtype vLLM's kernels do not take."""
    weight = model.lm_head.weight
    if weight.is_cuda:
        check_kernel_dtype(weight.dtype)
    d = model.config.dims
    return [VllmLoraLayer(d.hidden, d.q_size, d.kv_size, d.intermediate, rank, num_slots, weight.dtype, weight.device,
                          seed=seed + i)
            for i in range(d.num_layers)]


def install_lora(model: nn.Module, banks: list[VllmLoraLayer], mapping: LoraMapping) -> None:
    """Put a LoRA layer under each of the 4 sites' plugin layers (as in vLLM, the plugins'
    layer wraps vLLM's LoRA layer); :func:`remove_lora` takes them out."""
    for layer, bank in zip(model.model.layers, banks):
        for site in SITES:
            plugin_layer = layer.get_submodule(_SITE_PATHS[site])
            weights = bank.sites[site]
            plugin_layer.base_layer = LoraLinear(plugin_layer.base_layer, mapping, weights.lora_a, weights.lora_b)


def remove_lora(model: nn.Module) -> None:
    for layer in model.model.layers:
        for site in SITES:
            plugin_layer = layer.get_submodule(_SITE_PATHS[site])
            if isinstance(plugin_layer.base_layer, LoraLinear):
                plugin_layer.base_layer = plugin_layer.base_layer.base_layer


def load_peft_lora(adapter_dir: str | Path, banks: list[VllmLoraLayer], slot: int) -> None:
    """A saved PEFT LoRA (``adapter_config.json``, ``adapter_model.safetensors``, as the
    LoRA family saves it) into ``slot`` of every layer's bank, lora_b times alpha / rank.
    ValueError for per-module ranks (ALoRA) or a rank the banks do not hold."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern"):
        raise ValueError(f"{adapter_dir}: per-module ranks; the harness serves stock LoRA of one rank")
    scaling = config["lora_alpha"] / config["r"]
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for i, bank in enumerate(banks):
        found = {}
        for module in LINEAR_MODULES:
            prefix = f"base_model.model.model.layers.{i}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"
            if f"{prefix}.lora_A.weight" in weights:
                found[module] = (weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"] * scaling)
        bank.write_slot(slot, found)
