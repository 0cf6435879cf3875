"""Where the project caches what it builds.

Everything lives under ``$VLLM_PLUGINS_HOME`` (default ``~/.cache/vllm-plugins``):
``models/`` holds demo base models, ``adapters/`` trained adapters, ``reports/`` the
outputs of ``eval`` and ``demo``.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = os.environ.get("VLLM_PLUGINS_HOME") or Path.home() / ".cache" / "vllm-plugins"
    return Path(root).expanduser()


def models_dir() -> Path:
    return home() / "models"


def adapters_dir() -> Path:
    return home() / "adapters"


def reports_dir() -> Path:
    return home() / "reports"
