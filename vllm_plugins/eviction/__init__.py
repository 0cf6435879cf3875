"""KV cache eviction at the end of prefill.

    policies/   one module per policy (NACL, SCA, StreamingLLM, SnapKV, random): each only
                chooses the tokens a layer's KV heads keep
    settings    server flags and per-request ``vllm_xargs``, and their validation
    budget      how many tokens a prompt keeps in vLLM's paged cache
    reference   the same eviction on the transformers model

The serving side lives with the rest of the vLLM integration: the worker compacts the
cache in :mod:`vllm_plugins.serving.kv_eviction`, the scheduler frees blocks in
:mod:`vllm_plugins.serving.block_release`.
"""
