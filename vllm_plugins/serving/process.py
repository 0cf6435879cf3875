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


def request_json(url: str, body: dict | bytes | None = None, method: str | None = None,
                 api_key: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP request, with ``api_key`` as a bearer token if given;
    error statuses are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_SECONDS) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so a server
    never outlives a killed owner such as a Ray Serve replica."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """``vllm-plugins serve MODEL --adapter-dir DIR`` on 127.0.0.1, in its own process
    group; :meth:`start` returns once ``/health`` answers."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    @classmethod
    def start(cls, model: Path, adapter_dir: Path, log: Path, *vllm_args: str) -> ServerProcess:
        port = free_port()
        cmd = [
            sys.executable, "-m", "vllm_plugins.cli", "serve", str(model), "--adapter-dir", str(adapter_dir),
            "--host", "127.0.0.1", "--port", str(port), *vllm_args,
        ]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        server = cls(proc, f"http://127.0.0.1:{port}", log)
        try:
            server._wait_until_healthy()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {STARTUP_SECONDS}s:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server and its engine processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=60)


@contextlib.contextmanager
def running_server(model: Path, adapter_dir: Path, log: Path, *vllm_args: str) -> Iterator[str]:
    """A :class:`ServerProcess` for the ``with`` block; yields its base URL."""
    server = ServerProcess.start(model, adapter_dir, log, *vllm_args)
    try:
        yield server.url
    finally:
        server.stop()
