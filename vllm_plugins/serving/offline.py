"""Greedy generation with an offline vLLM engine (``vllm.LLM``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vllm_plugins.vllm_version import require_supported_vllm

# 1 GiB of KV cache is plenty for the demo model and leaves room on a 24 GiB machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM's switch: "0" runs the engine core in this process


def make_engine(model: str | Path, in_process: bool = False, **engine_args):
    """A vLLM engine for ``model``: float32 (as the reference), small KV cache, compiled as
    vLLM runs by default (pass ``enforce_eager=True`` for eager mode).

    By default vLLM starts its engine core in a spawned process: a script calling this
    needs an ``if __name__ == "__main__":`` guard. ``in_process=True`` runs the engine
    core, scheduler and worker in this process instead (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    while it is built): no process to spawn and import vLLM into, so an eager engine starts
    in seconds, and its scheduler and block pool can be read directly. Its side effects
    stay in this process: vLLM's distributed state, which any engine's shutdown tears down
    (so an in-process engine must not serve after another engine shut down); on the CPU,
    ``torch.set_num_threads`` made a no-op by vLLM's CPU worker; the engine core's
    ``gc.freeze()`` until its shutdown.
    """
    require_supported_vllm()
    from vllm import LLM

    defaults = dict(dtype="float32", max_model_len=2048, seed=0)
    with _engine_core_here() if in_process else contextlib.nullcontext():
        return LLM(model=str(model), **{**defaults, **engine_args})


@contextlib.contextmanager
def _engine_core_here() -> Iterator[None]:
    """vLLM's switch set to "0" while an engine is built, then restored, only that
    variable (vLLM sets others while it starts); and vLLM's environment cache reset, or
    its cached "0" would put later engines' cores in this process too."""
    from vllm_plugins.serving import vllm_internals as vi

    previous = os.environ.get(MULTIPROCESSING_ENV)
    os.environ[MULTIPROCESSING_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MULTIPROCESSING_ENV]
        else:
            os.environ[MULTIPROCESSING_ENV] = previous
        vi.reset_envs_cache()


@contextlib.contextmanager
def running_engine(model: str | Path, in_process: bool = False, **engine_args) -> Iterator:
    """:func:`make_engine`, whose engine core is shut down when the block ends (instead of
    whenever the engine is garbage-collected)."""
    engine = make_engine(model, in_process, **engine_args)
    try:
        yield engine
    finally:
        from vllm_plugins.serving import vllm_internals as vi

        vi.shutdown_engine(engine)


def greedy_texts(engine, prompts: list[str], max_tokens: int = 16) -> list[str]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [out.outputs[0].text.strip() for out in engine.generate(prompts, params, use_tqdm=False)]
