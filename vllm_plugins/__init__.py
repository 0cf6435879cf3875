"""Prompt-aware adapters, LoRA placement and KV-cache eviction for vLLM 0.32.

Layout:
    tasks/         seeded tenant tasks and the long-context retrieval task
    demo_model/    the embedded base model: vocabulary, corpus, tokenizer and training
    adapters/      one folder per method (IAPT, PARA, MiLoRA, LoRA, FanLoRA, ALoRA) and
                   the parts they share; storage.py reads and writes adapter directories
    training/      trainer, greedy generation and the evaluation table
    eviction/      KV cache eviction: policies, settings, budgets, transformers reference
    serving/       the vLLM integration (worker, scheduler, middleware, launcher)
    bench/ deploy/ loadtest/   benchmarks, Ray Serve, Locust load tests
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())  # quiet as a library (logs.py)
