"""Logging and progress bars: quiet as a library, informative as the ``vllm-plugins`` command.

Every module logs to ``logging.getLogger(__name__)`` under the ``vllm_plugins`` logger,
which has only a ``NullHandler`` until the command calls :func:`configure`. Long loops
(training, building the demo model) show a tqdm bar when their logger is enabled for
``INFO``, so code that imports the package prints nothing it did not ask for.
"""

from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm

ROOT = "vllm_plugins"
LEVEL_ENV = "VLLM_PLUGINS_LOGGING_LEVEL"


def configure() -> None:
    """Log the package's messages to stderr as ``[module] message``, at the level named by
    ``VLLM_PLUGINS_LOGGING_LEVEL`` (a name such as ``DEBUG`` or a number; default
    ``INFO``); ValueError for anything else."""
    logger = logging.getLogger(ROOT)
    level = os.environ.get(LEVEL_ENV, "INFO").strip()
    try:
        logger.setLevel(int(level) if level.isdigit() else level.upper())
    except ValueError:
        raise ValueError(f"{LEVEL_ENV}={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR or a number)") from None
    if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)


def progress_bar(logger: logging.Logger, total: int, desc: str) -> tqdm:
    """A tqdm bar over ``total`` steps, shown (at most every 5 s) only when ``logger`` is
    enabled for ``INFO``."""
    return tqdm(total=total, desc=desc, mininterval=5.0, disable=not logger.isEnabledFor(logging.INFO))
