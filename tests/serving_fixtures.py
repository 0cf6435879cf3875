"""Adapters and servers for serving tests.

Adapters have random (not trained) weights, saved as real adapter directories: parity
needs the same weights on both sides, not good ones. The weights are moved far enough
from their identity initialisation that every adapter changes the greedy tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from helpers import build
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import describe_base, save_adapter
from vllm_plugins.training.recipes import load_base

SCALES = {"iapt": 1.0, "para": 0.3, "milora": 0.3, "lora": 0.3}
STARTUP_SECONDS = 300
REQUEST_SECONDS = 300


def save_random_adapter(method: str, model_path: Path, out: Path, seed: int) -> Path:
    base_info = describe_base(load_base(model_path)[0], model_path)
    lm, _, _ = build(method, model_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * SCALES[method])
    spec = METHODS[method]
    config = spec.config_cls()
    save_adapter(out, method, config, lm, base_info, lora_settings=config if spec.family == "lora" else None)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_json(url: str, body: dict | bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP request; error statuses are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_SECONDS) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def running_server(model: Path, adapter_dir: Path, log: Path, *args: str) -> Iterator[str]:
    """``vllm-plugins serve`` on loopback, as a user starts it; yields its base URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm_plugins.cli", "serve", str(model), "--adapter-dir", str(adapter_dir),
        "--host", "127.0.0.1", "--port", str(port), *args,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def reference_answers(model_path: Path, adapter_path: Path | None, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of the transformers reference: the base model, or it with an adapter."""
    from vllm_plugins.adapters.common.lm import PlainLM
    from vllm_plugins.adapters.storage import load_adapter
    from vllm_plugins.training.evaluate import generate_answers

    base, tokenizer = load_base(model_path)
    lm = PlainLM(base) if adapter_path is None else load_adapter(adapter_path, base)[0]
    return generate_answers(lm, tokenizer, prompts, max_new_tokens=max_tokens)
