"""Fixes for vLLM 0.32.0 bugs that multi-tenant serving runs into, applied in every vLLM
process by the plugin entry point (:mod:`.plugin`).

**Tokens without a LoRA get the last LoRA slot's weights (CPU).** vLLM's PyTorch LoRA ops
(``vllm.lora.ops.torch_ops``, used by ``PunicaWrapperCPU``) gather each token's weights
with ``weights[index]``. A token of a request without a LoRA has index -1, which PyTorch
reads as the last slot: once all ``--max-loras`` slots hold adapters, base-model and
prompt-aware requests batched with LoRA requests get the last slot's LoRA added to every
linear layer. The fix zeroes the shrink result (x A^T) of tokens with a negative index,
so the expand step (which adds B h) adds nothing to them. The GPU kernels skip such tokens
and need no fix.

**Prompt log-probabilities beside LoRA stop the engine (CPU).** vLLM's LoRA logits
processor gathers one LoRA index per request of the step, and vLLM computes a request's
prompt log-probabilities from the logits of that request's prompt rows alone: with more
than one request in the step the shapes disagree and the engine dies, for every tenant.
:func:`prompt_logprobs_per_request` computes them one request at a time under that
request's own LoRA index (:func:`~.vllm_internals.logits_lora_of_request`), as a GPU does.

**A seeded request whose prompt spans several steps stops the engine (CPU).** vLLM
samples a token for every request of a step, also for one whose prompt is not complete,
and throws that token away; for a seeded request it then rewinds the request's generator
with ``set_offset(get_offset() - 4)``, which only CUDA generators support: a CPU
generator raises and the engine dies, for every tenant. The fix gives seeded requests on
the CPU a :class:`RewindableCpuGenerator`, which the runner marks before each step's
sampling (:func:`mark_seeded_generators`) and whose ``set_offset`` goes back to the mark:
the request's random stream continues as if the discarded token had not been drawn, as
on a GPU.

**A worker does not start in a process that has loaded numba (CPU without triton-cpu).**
At start-up the worker replaces vLLM's Triton kernels with C++ ones and rebinds every
reference to them by scanning the attributes of every loaded module. llvmlite (numba's
code generator) holds an object that answers every attribute, ``__dict__`` included, with
a wrapped C function, and the scan fails on it. SCA's selection loop and the CPU
compaction of kept tokens are compiled with numba, so an engine would not start in a
process that has evicted before (the transformers reference, an in-process engine). The
fix hides llvmlite's modules from the scan: they hold no vLLM kernel.
"""

from __future__ import annotations

import functools
import sys

import torch

from vllm_plugins.serving import vllm_internals as vi


def _zero_rows_without_lora(shrink, index_of):
    @functools.wraps(shrink)
    def wrapped(inputs, lora_a_weights, output_tensor, *args, **kwargs):
        shrink(inputs, lora_a_weights, output_tensor, *args, **kwargs)
        # One index for all rows (vLLM's logits path with prompt logprobs) or one per row.
        output_tensor[(index_of(*args) < 0).expand(output_tensor.shape[0])] = 0

    return wrapped


def _bgmv_token_indices(lora_indices_tensor: torch.Tensor, *rest) -> torch.Tensor:
    return lora_indices_tensor


def _sgmv_token_indices(
    b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor, *rest
) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def skip_lora_for_tokens_without_adapter() -> None:
    punica_cpu = vi.cpu_punica_ops()
    if getattr(punica_cpu.bgmv_shrink, "__wrapped__", None) is not None:
        return  # already applied in this process
    punica_cpu.bgmv_shrink = _zero_rows_without_lora(punica_cpu.bgmv_shrink, _bgmv_token_indices)
    punica_cpu.sgmv_shrink = _zero_rows_without_lora(punica_cpu.sgmv_shrink, _sgmv_token_indices)


def prompt_logprobs_per_request(runner, compute, hidden_states, num_scheduled_tokens: dict[str, int]) -> dict:
    """vLLM's ``_get_prompt_logprobs_dict`` (``compute``) for the step's requests one at a
    time, each under its own LoRA; the same result and bookkeeping as one call. On a GPU
    (whose LoRA logits path maps rows with other buffers) vLLM's own call, unchanged."""
    wanted = runner.num_prompt_logprobs
    if not (runner.lora_config and wanted) or runner.device.type != "cpu":
        return compute(hidden_states, num_scheduled_tokens)
    result = {}
    try:
        for req_id, num in list(wanted.items()):
            if req_id not in num_scheduled_tokens:
                continue
            runner.num_prompt_logprobs = {req_id: num}
            with vi.logits_lora_of_request(runner, req_id):
                result.update(compute(hidden_states, num_scheduled_tokens))
            if not runner.num_prompt_logprobs:  # its prompt is complete
                del wanted[req_id]
    finally:
        runner.num_prompt_logprobs = wanted
    return result


class RewindableCpuGenerator(torch.Generator):
    """A CPU generator that vLLM can rewind: :meth:`set_offset` returns to the state of
    the last :meth:`mark` (whatever offset it is given; vLLM only rewinds the draws of the
    step it marked)."""

    def mark(self) -> None:
        self._mark = self.get_state()

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        self.set_state(self._mark)


def mark_seeded_generators(runner) -> None:
    """Before a step samples: make every CPU generator of the step's seeded requests a
    :class:`RewindableCpuGenerator` (same seed, same position) and mark it."""
    for row, generator in list(vi.seeded_generators(runner).items()):
        if generator.device.type != "cpu":
            continue
        if not isinstance(generator, RewindableCpuGenerator):
            rewindable = RewindableCpuGenerator()
            rewindable.set_state(generator.get_state())
            vi.replace_generator(runner, row, rewindable)
            generator = rewindable
        generator.mark()


def hide_llvmlite_from_the_kernel_scan() -> None:
    current_platform = vi.platform()
    register = current_platform.register_triton_kernel_overrides
    if getattr(register, "__wrapped__", None) is not None:
        return  # already applied in this process

    @functools.wraps(register)
    def register_without_llvmlite() -> None:
        hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name.partition(".")[0] == "llvmlite"}
        try:
            register()
        finally:
            sys.modules.update(hidden)

    current_platform.register_triton_kernel_overrides = register_without_llvmlite
