"""ALoRA's super-network: a LoRA whose ranks are switched on and off one by one.

ALoRA (arXiv 2403.16187, Sec. 3.2) puts a gate on every rank of every LoRA module m:

    h = W_0 x + (alpha / r0) * sum_i g_i * B[:, i] A[i, :] x,      g_i in {0, 1}

r0 is the initial rank; the scaling stays alpha / r0 whatever the module's current rank,
so pruning or adding a rank leaves the other ranks' contribution unchanged. Pruning rank
i sets g_i = 0; a new rank takes a free slot (or a new one) with A kaiming-uniform, as
PEFT initialises it, and B zero, so it starts at no change to the model. The LoRA
modules sit on the frozen base model's linear modules through forward hooks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES, decoder_layers, linear_module


def _kaiming_rows(rows: int, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """A rows like PEFT's ``kaiming_uniform_(a=sqrt(5))``, fan-in ``in_features``."""
    weight = torch.empty(rows, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class GatedLora(nn.Module):
    """One module's LoRA, slots ``lora_A`` (slots, in) and ``lora_B`` (out, slots), a 0/1 gate each."""

    def __init__(self, base_linear: nn.Linear, rank: int, scaling: float):
        super().__init__()
        weight = base_linear.weight
        self.lora_A = nn.Parameter(_kaiming_rows(rank, base_linear.in_features, weight))
        self.lora_B = nn.Parameter(torch.zeros(base_linear.out_features, rank, dtype=weight.dtype, device=weight.device))
        self.register_buffer("gate", torch.ones(rank, dtype=weight.dtype, device=weight.device))
        self.scaling = scaling

    @property
    def rank(self) -> int:
        return int(self.gate.sum().item())

    def active_slots(self) -> list[int]:
        return torch.nonzero(self.gate).flatten().tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.lora_A.T) * self.gate) @ self.lora_B.T * self.scaling

    def prune(self, slot: int) -> None:
        self.gate[slot] = 0.0

    @torch.no_grad()
    def add_rank(self) -> None:
        """Switch on a fresh rank: A kaiming-uniform, B zero, in a free slot or a new one."""
        row = _kaiming_rows(1, self.lora_A.shape[1], self.lora_A)
        free = torch.nonzero(self.gate == 0).flatten().tolist()
        if free:
            self.lora_A[free[0]] = row[0]
            self.lora_B[:, free[0]] = 0.0
            self.gate[free[0]] = 1.0
            return
        self.lora_A = nn.Parameter(torch.cat([self.lora_A, row]))
        self.lora_B = nn.Parameter(torch.cat([self.lora_B, torch.zeros_like(self.lora_B[:, :1])], dim=1))
        self.gate = torch.cat([self.gate, torch.ones_like(self.gate[:1])])


def _adding_hook(lora: GatedLora):
    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + lora(args[0])

    return hook


class GatedLoraModel(PlainLM):
    """The frozen base with a :class:`GatedLora` on all 7 linear modules of every layer.

    Follows :class:`PlainLM`'s calling convention, so the adapter trainer trains it and
    ``batch_loss`` scores it. ``paths[k]`` is the module path of ``loras[k]``
    (``model.layers.0.self_attn.q_proj``), as PEFT names the base model's modules.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base)
        base.requires_grad_(False)
        path_of = {module: path for path, module in base.named_modules()}
        linears = [linear_module(layer, name) for layer in decoder_layers(base) for name in LINEAR_MODULES]
        self.paths = tuple(path_of[linear] for linear in linears)
        self.loras = nn.ModuleList(GatedLora(linear, rank, alpha / rank) for linear in linears)
        self._handles: list[RemovableHandle] = [
            linear.register_forward_hook(_adding_hook(lora)) for linear, lora in zip(linears, self.loras)
        ]

    def ranks(self) -> dict[str, int]:
        """Current rank (active gates) per module path."""
        return {path: lora.rank for path, lora in zip(self.paths, self.loras)}

    def remove_hooks(self) -> None:
        """Detach the LoRA modules from the base model, which is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
