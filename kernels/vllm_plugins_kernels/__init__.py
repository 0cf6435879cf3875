"""Triton kernels of the plugins' per-token and per-request work, each beside a plain-torch
reference of the same function.

Every public op takes the same arguments on any device: on CUDA tensors it launches the
Triton kernel, elsewhere it runs the torch reference (``*_torch``); ``*_triton`` names the
kernel's launcher. One exception: on CPU tensors ``compact_kept_`` (and ``compact_kept_layers_``) runs a compiled loop
(:mod:`.eviction_cpu`), because the reference is slow there. On a machine without a GPU
the kernels still run in Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is
imported), which is how the test suite checks them.

- :mod:`.rescale`: PARA's per-request rescaling of fused projection outputs.
- :mod:`.soft_kv`: IAPT's soft keys/values, written into the paged cache and attended to.
- :mod:`.expert_lora`: MiLoRA's chosen experts, batched across requests.
- :mod:`.eviction`: proxy-attention scores and in-place compaction of kept tokens.
"""

from vllm_plugins_kernels.eviction import compact_kept_, compact_kept_layers_, proxy_attention_scores
from vllm_plugins_kernels.expert_lora import expert_lora_
from vllm_plugins_kernels.rescale import rescale_columns_
from vllm_plugins_kernels.soft_kv import soft_attention_paged_, write_soft_kv

__all__ = [
    "compact_kept_",
    "compact_kept_layers_",
    "expert_lora_",
    "proxy_attention_scores",
    "rescale_columns_",
    "soft_attention_paged_",
    "write_soft_kv",
]
