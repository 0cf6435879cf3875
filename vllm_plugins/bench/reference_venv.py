"""Virtual environments for reference libraries whose pins clash with ours.

NVIDIA kvpress 0.5.5 needs transformers < 5.3 and vLLM 0.32 needs 5.16-5.19, so kvpress
runs in a venv of its own, created on first use under
``$VLLM_PLUGINS_HOME/venvs/kvpress-0.5.5`` (:mod:`vllm_plugins.paths`) by the ordinary
``venv`` module and pip (with pip's configuration, so a local wheel folder or index is
used when pip is set up for one). It gets the same torch version as ours (a CPU build
here, ``torch==2.13.0+cpu``, rather than a several-GB CUDA build), pinned beside kvpress
so that pip resolves both together. A marker file written after a successful install
records the requirements: a venv with another marker, or none (an install cut short), is
rebuilt from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import venv
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from vllm_plugins.paths import home

logger = logging.getLogger(__name__)

KVPRESS_VERSION = "0.5.5"
MARKER = ".vllm-plugins-installed.json"
INSTALL_LOG = "install.log"


@dataclass(frozen=True)
class ReferenceVenv:
    """A venv under ``$VLLM_PLUGINS_HOME/venvs/<name>`` holding ``requirements`` (pip specifiers)."""

    name: str
    requirements: tuple[str, ...]

    @property
    def path(self) -> Path:
        return home() / "venvs" / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def is_installed(self) -> bool:
        """Whether a finished install of exactly these requirements is there."""
        marker = self.path / MARKER
        try:
            return self.python.exists() and json.loads(marker.read_text()) == list(self.requirements)
        except (OSError, ValueError):
            return False


def kvpress_venv(torch_version: str | None = None) -> ReferenceVenv:
    """kvpress's venv: kvpress ``KVPRESS_VERSION`` and ``torch_version`` (default: the
    version installed beside this package, local tag included, e.g. ``2.13.0+cpu``)."""
    torch_version = torch_version or version("torch")
    return ReferenceVenv(f"kvpress-{KVPRESS_VERSION}", (f"torch=={torch_version}", f"kvpress=={KVPRESS_VERSION}"))


def ensure_venv(spec: ReferenceVenv) -> Path:
    """The venv's python, creating the venv first when it is not installed (minutes:
    torch, transformers, kvpress and their dependencies). Raises RuntimeError, with the
    end of pip's log, when the install fails."""
    if spec.is_installed():
        return spec.python
    logger.info(f"creating {spec.path} with {' '.join(spec.requirements)} (once; pip's log: {spec.path / INSTALL_LOG})")
    venv.EnvBuilder(with_pip=True, clear=True).create(spec.path)
    log = spec.path / INSTALL_LOG
    with log.open("w") as out:
        done = subprocess.run(
            [str(spec.python), "-m", "pip", "install", "--progress-bar", "off", *spec.requirements],
            stdout=out, stderr=subprocess.STDOUT, env=isolated_env(),
        )
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"pip could not install {' '.join(spec.requirements)} into {spec.path}:\n{tail}")
    (spec.path / MARKER).write_text(json.dumps(list(spec.requirements)))
    return spec.python


def isolated_env() -> dict[str, str]:
    """This process's environment without what points Python at our venv or source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
