"""Small helpers the tests share."""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from unittest import mock

import torch

from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.tasks import load_task
from vllm_plugins.training.data import collate, encode
from vllm_plugins.training.recipes import load_base


def task_batch(tokenizer, task: str = "reverse", n: int = 6):
    return collate(encode(tokenizer, load_task(task).train[:n]), tokenizer.pad_token_id)


def build(method: str, model_path, **overrides):
    """The untrained adapter of ``method`` over a fresh copy of the base model."""
    base, tokenizer = load_base(model_path)
    spec = METHODS[method]
    config = spec.config_cls(**overrides)
    return spec.build(base, config), base, tokenizer


def perturb(lm, seed: int = 0, scale: float = 0.5) -> None:
    """Move every trainable parameter away from its initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _refuse_execve(*args) -> None:
    raise AssertionError(f"the command went on to replace the test's process: {args[1]}")


def run_cli(*args: str) -> tuple[int, str]:
    """(exit status, stderr) of ``vllm-plugins ARGS`` run in this process through the
    command's ``main``, as its entry point runs it: for runs that are refused or short,
    without the seconds a new interpreter spends importing torch. ``serve`` reaching
    ``os.execve`` (vllm serve) fails the test instead of replacing its process. The
    ``vllm_plugins`` logger is left as it was found (``main`` configures it)."""
    from vllm_plugins import cli, logs

    logger = logging.getLogger(logs.ROOT)
    handlers, level = list(logger.handlers), logger.level
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), mock.patch("os.execve", _refuse_execve):
            try:
                status = cli.main(list(args))
            except SystemExit as stop:  # argparse's refusals
                status = stop.code
    finally:
        logger.handlers[:], logger.level = handlers, level
    return status, stderr.getvalue()


def run_python(script: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """The standard output of ``script`` run by a new interpreter (``env``: its whole
    environment, default this process's); fails the test if it exits non-zero."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
