"""The ``vllm.general_plugins`` entry point: vLLM loads it in every process it starts.

It checks the vLLM version first, so an unsupported vLLM fails at start-up with a clear
message instead of serving wrong, then applies :mod:`.vllm_fixes` and gives the process
the key of the adapter tickets (:mod:`.tickets`), before vLLM starts its engine processes. The worker, scheduler
and middleware are selected with vLLM's own flags (see ``launcher.py``).
"""

from __future__ import annotations

from vllm_plugins.serving.tickets import ensure_key
from vllm_plugins.serving.vllm_fixes import hide_llvmlite_from_the_kernel_scan, skip_lora_for_tokens_without_adapter
from vllm_plugins.vllm_version import require_supported_vllm


def register() -> None:
    require_supported_vllm()
    skip_lora_for_tokens_without_adapter()
    hide_llvmlite_from_the_kernel_scan()
    ensure_key()
