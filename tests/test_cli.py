"""The ``vllm-plugins`` command line, run as a user runs it."""

import json
import os
import subprocess
import sys

from vllm_plugins.adapters.storage import MANIFEST


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_plugins.cli", *args],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )


def test_train_writes_a_self_describing_adapter(tiny_llama, tmp_path):
    out = tmp_path / "acme"
    result = _cli("train", "--method", "para", "--task", "reverse", "--out", str(out),
                  "--steps", "3", "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == "para" and manifest["task"] == "reverse"
    assert manifest["config"]["bottleneck"] > 0
    assert manifest["metrics"]["train_steps"] == 3
    assert (out / manifest["weights"]["file"]).is_file()


def test_train_refuses_an_unknown_method(tmp_path):
    result = _cli("train", "--method", "prefix-magic", "--task", "reverse", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "invalid choice: 'prefix-magic'" in result.stderr
