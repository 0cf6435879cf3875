"""MiLoRA's per-layer router and LoRA experts.

Each of the layer's seven linear modules (q, k, v, o, gate, up, down) carries one LoRA
expert E_e(x) = (alpha / r) B_e A_e x. Once per request (MiLoRA, Sec. 3.2):

    p = softmax(R_l(AttnPool(H_l)) W_r)       over the 7 experts
    keep the top-k experts; an active expert adds p_e * E_e(x) to its module's output

The router probability scales an active expert's output, which gives the router a gradient
beyond the balance loss. The choice stays fixed for all of the request's tokens. The
Switch-style balance loss is 7 * sum_e f_e * P_e, f_e the share of requests in the batch
routed to e (divided by k) and P_e the mean router probability. B starts at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES, Dims, linear_module
from vllm_plugins.adapters.common.pooling import AttentionPooling
from vllm_plugins.adapters.common.prompt_aware import AdapterRuntime, PromptAwareLayer
from vllm_plugins.adapters.common.rational import RationalActivation


@dataclass
class MiloraState:
    probs: torch.Tensor  # (batch, experts) router probabilities
    gates: torch.Tensor  # (batch, experts): p_e for the top-k experts, 0 elsewhere

    @property
    def chosen(self) -> torch.Tensor:
        """Indices of the active experts, (batch, k), sorted."""
        return torch.nonzero(self.gates > 0)[:, 1].view(self.gates.shape[0], -1)


class LoraExpert(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


class MiloraLayer(PromptAwareLayer):
    def __init__(self, dims: Dims, rank: int, alpha: float, top_k: int, balance_weight: float):
        super().__init__()
        self.balance_weight = balance_weight
        if not 1 <= top_k <= len(LINEAR_MODULES):
            raise ValueError(f"top_k must be in [1, {len(LINEAR_MODULES)}], got {top_k}")
        self.top_k = top_k
        self.pool = AttentionPooling(dims.hidden)
        self.activation = RationalActivation()
        self.router = nn.Linear(dims.hidden, len(LINEAR_MODULES))
        self.experts = nn.ModuleDict(
            {name: LoraExpert(*dims.linear_shape(name), rank, alpha) for name in LINEAR_MODULES}
        )

    def state_from_pooled(self, pooled: torch.Tensor) -> MiloraState:
        probs = torch.softmax(self.router(self.activation(pooled.squeeze(1))), dim=-1)
        top = probs.topk(self.top_k, dim=-1).indices
        keep = torch.zeros_like(probs).scatter(-1, top, 1.0)
        return MiloraState(probs=probs, gates=probs * keep)

    def aux_loss(self, state: MiloraState) -> torch.Tensor:
        routed = (state.gates > 0).float().mean(0) / self.top_k
        balance = len(LINEAR_MODULES) * (routed * state.probs.mean(0)).sum()
        return self.balance_weight * balance

    def install(self, decoder_layer: nn.Module, runtime: AdapterRuntime, index: int) -> list[RemovableHandle]:
        def expert_hook(expert_index: int, expert: LoraExpert):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                adapt = runtime.adapt_mask(output)
                if adapt is None:
                    return output
                gate = runtime.states[index].gates[:, expert_index].view(-1, 1, 1)
                return output + adapt * gate * expert(args[0])

            return hook

        return [
            linear_module(decoder_layer, name).register_forward_hook(expert_hook(i, self.experts[name]))
            for i, name in enumerate(LINEAR_MODULES)
        ]
