"""The plugins' custom ops: the only way their work enters vLLM's model forward.

Registered with ``torch.library`` under the ``vllm_plugins`` namespace, each with a fake
(meta) implementation, so torch.compile treats them as opaque calls: they are traced once
as calls, never into, and run their real implementation at every step. They take the
step's activations and the layer's number; everything that changes per step is read from
:class:`~.metadata.PromptAwareMetadata` and :class:`~.kv_eviction.KvEviction`, which the
runner fills before the forward pass (as vLLM's own attention op finds its KV cache and
metadata by layer name). The real implementations are the same on every device: the
methods call the ops of ``vllm_plugins_kernels``, which launch the Triton kernels on CUDA
tensors and run their torch references elsewhere.

* ``prompt_aware_prefill(hidden, layer) -> dep``: pooling and the once-per-request state
  (:meth:`~.prompt_aware.PromptAwareRuntime.prefill`). Returns an empty tensor that the
  same layer's ``qkv`` apply takes, so the compiler keeps the two in order and never
  drops the call (vLLM's ``unified_kv_cache_update`` does the same).
* ``prompt_aware_apply(x, out!, dep, layer, site)``: the methods' per-token work on a
  site's output, in place (:meth:`~.prompt_aware.PromptAwareRuntime.apply`).
* ``kv_eviction_capture(query, layer) -> dep``: an evicting request's last prompt queries
  into the capture buffer (:meth:`~.kv_eviction.KvEviction.capture`); the attention
  site's apply takes the result.

Under CUDA graphs (:mod:`.cuda_graphs`) ``prompt_aware_apply`` reads only device buffers
and is captured, with the work of the methods acting while it was captured;
``prompt_aware_prefill`` and ``kv_eviction_capture`` read the step's pooled tokens and
capture count on the host (each returns at once in a step where it has no work, as in a
full decode graph) and run as graph-splitting ops.
"""

from __future__ import annotations

import torch

from vllm_plugins.serving.methods import SITES

_LIBRARY = torch.library.Library("vllm_plugins", "FRAGMENT")
_RUNTIMES: dict[str, object] = {}  # "prompt_aware" and "kv_eviction" of this worker process


def bind(prompt_aware, kv_eviction) -> None:
    """Make this worker's runtimes the ones the ops serve (one model per process)."""
    _RUNTIMES.update(prompt_aware=prompt_aware, kv_eviction=kv_eviction)


def _prompt_aware_prefill(hidden: torch.Tensor, layer: int) -> torch.Tensor:
    _RUNTIMES["prompt_aware"].prefill(layer, hidden)
    return hidden.new_empty(0)


def _prompt_aware_apply(x: torch.Tensor, out: torch.Tensor, dep: torch.Tensor | None, layer: int, site: int) -> None:
    _RUNTIMES["prompt_aware"].apply(SITES[site], layer, x, out)


def _kv_eviction_capture(query: torch.Tensor, layer: int) -> torch.Tensor:
    _RUNTIMES["kv_eviction"].capture(layer, query)
    return query.new_empty(0)


def _fake_dep(first: torch.Tensor, layer: int) -> torch.Tensor:
    return first.new_empty(0)


def _fake_apply(x: torch.Tensor, out: torch.Tensor, dep: torch.Tensor | None, layer: int, site: int) -> None:
    return None


_LIBRARY.define("prompt_aware_prefill(Tensor hidden, int layer) -> Tensor")
_LIBRARY.define("prompt_aware_apply(Tensor x, Tensor(a!) out, Tensor? dep, int layer, int site) -> ()")
_LIBRARY.define("kv_eviction_capture(Tensor query, int layer) -> Tensor")
for _name, _impl, _fake in (
    ("prompt_aware_prefill", _prompt_aware_prefill, _fake_dep),
    ("prompt_aware_apply", _prompt_aware_apply, _fake_apply),
    ("kv_eviction_capture", _kv_eviction_capture, _fake_dep),
):
    _LIBRARY.impl(_name, _impl, "CPU")
    _LIBRARY.impl(_name, _impl, "CUDA")
    torch.library.register_fake(f"vllm_plugins::{_name}", _fake, lib=_LIBRARY)

prompt_aware_prefill = torch.ops.vllm_plugins.prompt_aware_prefill
prompt_aware_apply = torch.ops.vllm_plugins.prompt_aware_apply
kv_eviction_capture = torch.ops.vllm_plugins.kv_eviction_capture
