"""A Llama decoder stack in plain PyTorch with vLLM's module names.

``model.layers[i]`` has ``input_layernorm``, ``self_attn.{qkv_proj, attn, o_proj}``,
``post_attention_layernorm`` and ``mlp.{gate_up_proj, down_proj}``, as vLLM's
``LlamaForCausalLM``: q/k/v fused into one projection ([q; k; v] columns), gate/up into
another ([gate; up]), the attention a module of its own that receives rotated queries and
keys. So the plugins' :func:`~vllm_plugins.serving.layers.install_plugin_layers` wraps
it as it wraps vLLM's model. Linear layers expose ``quant_method.apply(layer, x)`` as
vLLM's unquantised layers do, which the plugins call to reach a layer's weights.

Numerics follow transformers' Llama (RMSNorm in float32, rotary embedding of the default
type, softmax in float32), so weights loaded from a transformers checkpoint
(:meth:`LlamaStack.from_checkpoint`) give its tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from vllm_plugins.adapters.common.model_parts import Dims, apply_rotary, dims
from vllm_plugins.decode_harness.attention import PagedAttention, StepInputs

ARCHITECTURE = "LlamaForCausalLM"


@dataclass(frozen=True)
class StackConfig:
    dims: Dims
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> StackConfig:
        """A transformers Llama checkpoint's ``config.json``; ValueError for another architecture."""
        config = json.loads((Path(path) / "config.json").read_text())
        if config.get("architectures") != [ARCHITECTURE]:
            raise ValueError(f"{path}: the harness builds {ARCHITECTURE}, not {config.get('architectures')}")
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{path}: rotary embedding of type {rope['rope_type']!r}; the harness has the default only")
        hf = type("HfConfig", (), config)
        return cls(dims(hf), config["vocab_size"], rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                   config["rms_norm_eps"])


class _Unquantized:
    """``apply`` of vLLM's ``UnquantizedLinearMethod``: x W^T (+ bias)."""

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class Linear(nn.Module):
    quant_method = _Unquantized()

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding of the default type (transformers' Llama), at the
    positions in the step's buffers."""

    def __init__(self, head_dim: int, theta: float, inputs: StepInputs):
        super().__init__()
        self.inputs = inputs
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq.to(inputs.positions.device), persistent=False)

    def angles(self) -> torch.Tensor:
        """(positions a request can reach, head_dim / 2): each rotation plane's angle at
        each position, radians."""
        return self.inputs.key_positions[:, None].float() * self.inv_freq

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """x (tokens, heads * head_dim) -> rotated, same shape."""
        n = x.shape[0]
        freqs = self.inputs.positions[:n, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[None]
        rotated = apply_rotary(x.view(1, n, heads, -1), angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        return rotated.reshape(n, -1)


class SelfAttention(nn.Module):
    def __init__(self, d: Dims, inputs: StepInputs, rotary: Rotary, num_blocks: int, dtype, device):
        super().__init__()
        self.d = d
        self.rotary = rotary
        self.qkv_proj = Linear(d.hidden, d.q_size + 2 * d.kv_size, dtype, device)
        self.attn = PagedAttention(inputs, d.num_heads, d.num_kv_heads, d.head_dim, num_blocks, dtype, device)
        self.o_proj = Linear(d.q_size, d.hidden, dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        d = self.d
        q, k, v = self.qkv_proj(hidden).split([d.q_size, d.kv_size, d.kv_size], dim=-1)
        out = self.attn(self.rotary(q, d.num_heads), self.rotary(k, d.num_kv_heads), v)
        return self.o_proj(out)


class Mlp(nn.Module):
    def __init__(self, d: Dims, dtype, device):
        super().__init__()
        self.gate_up_proj = Linear(d.hidden, 2 * d.intermediate, dtype, device)
        self.down_proj = Linear(d.intermediate, d.hidden, dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: StackConfig, inputs: StepInputs, rotary: Rotary, num_blocks: int, dtype, device):
        super().__init__()
        d = config.dims
        self.input_layernorm = RMSNorm(d.hidden, config.rms_norm_eps, dtype, device)
        self.self_attn = SelfAttention(d, inputs, rotary, num_blocks, dtype, device)
        self.post_attention_layernorm = RMSNorm(d.hidden, config.rms_norm_eps, dtype, device)
        self.mlp = Mlp(d, dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Decoder(nn.Module):
    def __init__(self, config: StackConfig, inputs: StepInputs, num_blocks: int, dtype, device):
        super().__init__()
        d = config.dims
        rotary = Rotary(d.head_dim, config.rope_theta, inputs)
        self.embed_tokens = nn.Embedding(config.vocab_size, d.hidden, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, inputs, rotary, num_blocks, dtype, device)
                                    for _ in range(d.num_layers))
        self.norm = RMSNorm(d.hidden, config.rms_norm_eps, dtype, device)


class LlamaStack(nn.Module):
    """The decoder (``self.model``, vLLM's layout) and its head; reads the step's token ids
    and positions from ``inputs``."""

    def __init__(self, config: StackConfig, inputs: StepInputs, num_blocks: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.config = config
        self.inputs = inputs
        self.model = Decoder(config, inputs, num_blocks, dtype, device)
        self.lm_head = Linear(config.dims.hidden, config.vocab_size, dtype, device)

    def forward(self, num_tokens: int) -> torch.Tensor:
        """The last layer's normalised hidden states (tokens, hidden) of the step's first
        ``num_tokens`` tokens."""
        hidden = self.model.embed_tokens(self.inputs.input_ids[:num_tokens])
        for layer in self.model.layers:
            hidden = layer(hidden)
        return self.model.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(tokens, vocab) in float32."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def randomize(self, seed: int, std: float = 0.02) -> None:
        """Random weights (normal, ``std``; norms at 1): timing needs no trained model."""
        generator = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def load_checkpoint(self, path: str | Path) -> None:
        """Weights of a transformers Llama checkpoint (``*.safetensors``), q/k/v and
        gate/up fused as vLLM fuses them. ValueError if a tensor is missing or misshapen."""
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            weights.update(load_file(str(file)))

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"{path}: the checkpoint lacks {name}")
            return weights[name]

        def put(param: nn.Parameter, value: torch.Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ValueError(f"{path}: {name} is {tuple(value.shape)}, the harness expects {tuple(param.shape)}")
            param.copy_(value)

        put(self.model.embed_tokens.weight, take("model.embed_tokens.weight"), "embed_tokens")
        put(self.model.norm.weight, take("model.norm.weight"), "norm")
        put(self.lm_head.weight, take("lm_head.weight"), "lm_head")
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}."
            put(layer.input_layernorm.weight, take(p + "input_layernorm.weight"), p + "input_layernorm")
            put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"), p + "post_attention_layernorm")
            qkv = torch.cat([take(p + f"self_attn.{m}_proj.weight") for m in "qkv"])
            put(layer.self_attn.qkv_proj.weight, qkv, p + "self_attn.qkv_proj")
            put(layer.self_attn.o_proj.weight, take(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj")
            gate_up = torch.cat([take(p + f"mlp.{m}_proj.weight") for m in ("gate", "up")])
            put(layer.mlp.gate_up_proj.weight, gate_up, p + "mlp.gate_up_proj")
            put(layer.mlp.down_proj.weight, take(p + "mlp.down_proj.weight"), p + "mlp.down_proj")
