"""Start ``vllm-plugins serve`` as a child process and talk to it over HTTP (loopback).

Used by the demo, the load tests and the test suite: the same server a user starts.
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

STARTUP_SECONDS = 300
REQUEST_SECONDS = 300


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
def running_server(model: Path, adapter_dir: Path, log: Path, *vllm_args: str) -> Iterator[str]:
    """``vllm-plugins serve MODEL --adapter-dir DIR`` on 127.0.0.1; yields its base URL
    once ``/health`` answers, and stops the server (and its engine processes) after."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm_plugins.cli", "serve", str(model), "--adapter-dir", str(adapter_dir),
        "--host", "127.0.0.1", "--port", str(port), *vllm_args,
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
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
                time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
