"""``vllm-plugins serve``: ``vllm serve`` with the plugins' flags filled in.

    vllm-plugins serve MODEL --adapter-dir DIR [--max-active N] [--max-rank R] [--max-soft-tokens S]
        [--runtime-loading]
        [--kv-eviction POLICY [--kv-keep-ratio R | --kv-budget N] [--kv-eviction-min-prompt N]]
        [VLLM ARGS...]

runs

    vllm serve MODEL --worker-cls WORKER --scheduler-cls ...PromptAwareScheduler
        --middleware ...PromptAdapterMiddleware
        --additional-config '{"prompt_adapters": {"dir": DIR, ...}, "kv_eviction": {...}}'
        [--enable-lora --max-lora-rank R --lora-modules NAME=PATH ...]   # LoRA-family adapters in DIR
        VLLM ARGS...

with the worker of vLLM's platform (:func:`platform_serving`): on the CPU platform
``PromptAwareCPUWorker``; on CUDA ``PromptAwareGPUWorker``, with Model Runner V1
(``VLLM_USE_V2_MODEL_RUNNER=0``) and ``--no-async-scheduling``. Another platform is
refused before anything starts.

Every sub-directory of DIR is an adapter named after the directory: prompt-aware ones
are served by the plugin, LoRA-family ones (lora, fanlora, alora) by vLLM's stock LoRA.
A prompt-aware adapter the server cannot hold is left out by the server, which serves the
rest and says why in its log and in ``/v1/models`` (:mod:`.registry`).

The server listens on 127.0.0.1 unless ``--host`` is among the vLLM arguments (``vllm
serve`` alone listens on every interface), and on the CPU its KV cache takes 4 GiB unless
the vLLM arguments size it (:data:`CPU_KV_CACHE_BYTES`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import AdapterError, read_manifest
from vllm_plugins.eviction import settings as eviction_settings
from vllm_plugins.eviction.settings import EvictionSettings
from vllm_plugins.serving import openmp
from vllm_plugins.serving.config import SECTION, PromptAdapterSettings

logger = logging.getLogger(__name__)

CPU_WORKER = "vllm_plugins.serving.worker.PromptAwareCPUWorker"
GPU_WORKER = "vllm_plugins.serving.gpu_worker.PromptAwareGPUWorker"
SCHEDULER = "vllm_plugins.serving.scheduler.PromptAwareScheduler"
MIDDLEWARE = "vllm_plugins.serving.frontend.PromptAdapterMiddleware"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM 0.32 accepts as max_lora_rank
CPU_KV_CACHE_BYTES = 4 << 30
"""The KV cache ``vllm-plugins serve`` asks for on the CPU unless ``--kv-cache-memory-bytes``
or ``--gpu-memory-utilization`` is given (vLLM's ``VLLM_CPU_KVCACHE_SPACE``, in GiB, still
overrides both). Without a size, vLLM 0.32's CPU worker reserves
``--gpu-memory-utilization`` (0.92) of the memory node and refuses to start when other
work holds more than 8% of it."""


@dataclass(frozen=True)
class PlatformServing:
    """How ``vllm serve`` runs the plugins on one vLLM platform: the worker class, the
    environment vLLM needs, and vLLM arguments added unless the user's set them
    (``(flags, args)``: ``args`` unless one of ``flags`` is given)."""

    worker: str
    environment: dict[str, str] = field(default_factory=dict)
    defaults: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()


def platform_serving() -> PlatformServing:
    """The plugins' way of serving on vLLM's current platform. Raises ValueError on a
    platform the plugins have no worker for (anything but CPU and CUDA)."""
    from vllm_plugins.serving import vllm_internals as vi

    device = vi.platform().device_type
    if device == "cpu":
        sized = ("--kv-cache-memory-bytes", "--gpu-memory-utilization", "--device-memory-utilization")
        return PlatformServing(CPU_WORKER, defaults=((sized, ("--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES))),))
    if device == "cuda":
        scheduling = ("--async-scheduling", "--no-async-scheduling")
        return PlatformServing(GPU_WORKER, {"VLLM_USE_V2_MODEL_RUNNER": "0"}, ((scheduling, ("--no-async-scheduling",)),))
    raise ValueError(f"vLLM's platform here is {device!r}: the plugins provide workers for vLLM's CPU and CUDA platforms "
                     "only, and will not serve on another")


def serve_environment() -> dict[str, str]:
    """The environment ``vllm serve`` runs in: this process's, OpenMP's busy-wait bounded
    unless it says otherwise (:mod:`.openmp`), and what the platform needs."""
    return {**openmp.spin_environment(), **os.environ, **platform_serving().environment}


def _lora_rank(manifest: dict) -> int:
    """The highest rank of a LoRA-family adapter; AdapterError if vLLM cannot serve it."""
    lora = manifest.get("lora") or {}
    pattern = lora.get("rank_pattern") or {} if isinstance(lora, dict) else None
    if not isinstance(pattern, dict):
        raise AdapterError("the manifest's lora settings are not a JSON object")
    ranks = [lora.get("rank", 8), *pattern.values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= LORA_RANKS[-1] for r in ranks):
        raise AdapterError(f"LoRA ranks must be integers from 1 to {LORA_RANKS[-1]} (vLLM's largest --max-lora-rank)")
    return max(ranks)


def _vllm_serve(model: str) -> list[str]:
    """The command that starts vLLM's OpenAI server for ``model``.

    vLLM's ``vllm`` CLI reads the version of a distribution named "vllm"; the CPU build
    (distribution "vllm-cpu") has none, and its CLI dies on it, so there the API server
    module is started directly (same server, same flags).
    """
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]


def serve_argv(
    model: str, adapters: PromptAdapterSettings, vllm_args: list[str], eviction: EvictionSettings = EvictionSettings(),
) -> list[str]:
    """The ``vllm serve`` command line; ``adapters.dir`` is the adapter directory.

    Raises ValueError for settings the server cannot take, before anything starts: among
    them a platform the plugins have no worker for (:func:`platform_serving`)."""
    serving = platform_serving()
    root = Path(adapters.dir).resolve()
    if not root.is_dir():
        raise ValueError(f"adapter directory {adapters.dir} does not exist")
    lora_modules, ranks = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            manifest = read_manifest(sub)
            if METHODS[manifest["method"]].family == "lora":
                ranks.append(_lora_rank(manifest))
                lora_modules.append(f"{sub.name}={sub}")
        except (AdapterError, OSError) as err:  # prompt-aware ones: the server's registry logs and lists them
            logger.warning("adapter %r is not served: %s", sub.name, err)
    settings = {SECTION: {**adapters.model_dump(), "dir": str(root)}}
    if eviction.policy is not None:
        settings[eviction_settings.SECTION] = eviction.model_dump()
    argv = _vllm_serve(model) + [
        "--worker-cls", serving.worker,
        "--scheduler-cls", SCHEDULER,
        "--middleware", MIDDLEWARE,
        "--additional-config", json.dumps(settings),
    ]
    if lora_modules:
        max_rank = next(r for r in LORA_RANKS if r >= max(ranks))
        argv += ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(min(len(lora_modules), adapters.max_active))]
        argv += ["--lora-modules", *lora_modules]
    if not _given(vllm_args, "--host"):
        argv += ["--host", "127.0.0.1"]
    for flags, args in serving.defaults:
        if not _given(vllm_args, *flags):
            argv += args
    return argv + vllm_args


def _given(vllm_args: list[str], *flags: str) -> bool:
    """Whether the vLLM arguments set one of ``flags`` (long options) in any spelling vLLM's
    parser takes: with ``=``, with underscores, abbreviated, or as a key of a ``--config``
    YAML file."""
    names = {arg.split("=", 1)[0].replace("_", "-") for arg in vllm_args if arg.startswith("--")}
    names |= {"--" + str(key).replace("_", "-") for key in _config_keys(vllm_args)}
    return any(name == flag or (len(name) > 4 and flag.startswith(name)) for name in names for flag in flags)


def _config_keys(vllm_args: list[str]) -> list:
    """The keys of the ``--config`` file among the vLLM arguments (none if it has none or
    cannot be read: vLLM reports that itself)."""
    import yaml  # a vLLM dependency

    paths = [arg.split("=", 1)[1] for arg in vllm_args if arg.startswith("--config=")]
    paths += [after for arg, after in zip(vllm_args, vllm_args[1:]) if arg == "--config"]
    if not paths:
        return []
    try:
        config = yaml.safe_load(Path(paths[0]).read_text())
    except (OSError, yaml.YAMLError):
        return []
    return list(config) if isinstance(config, dict) else []
