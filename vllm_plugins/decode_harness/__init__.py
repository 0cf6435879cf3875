"""A vLLM-free decode step for the plugins: a Llama decoder stack in plain PyTorch whose
modules carry vLLM's Llama names and are wrapped by the plugins' own layers
(:func:`~vllm_plugins.serving.layers.install_plugin_layers`), fed by the same per-step
metadata and runtime as in serving (:class:`~vllm_plugins.serving.prompt_aware.PromptAwareRuntime`).

It runs where vLLM cannot be installed (the GPU machine lent to some sessions has torch
and Triton only), so that one decode step of each method can be captured in a CUDA graph,
replayed with other requests and timed (``vllm-plugins bench decode-step``,
:mod:`vllm_plugins.bench.decode_step`), and at tiny shapes checked against the reference
adapters on the CPU (``tests/test_decode_harness.py``).

- :mod:`.model`: the decoder stack (vLLM's module names, fused qkv and gate/up);
- :mod:`.attention`: the step's inputs in persistent buffers and a paged attention in torch;
- :mod:`.lora`: stock LoRA the way vLLM applies it (vLLM's own kernels on CUDA);
- :mod:`.memory_adapters`: random prompt-aware adapters held in memory, for timing;
- :mod:`.engine`: requests, prefill and decode steps through the plugins' runtime.
"""
