"""Shared fixtures: tiny demo models built once per session in a temporary home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def plugins_home(tmp_path_factory) -> Path:
    """Keep everything the tests build out of the user's cache."""
    home = Path(os.environ.get("VLLM_PLUGINS_TEST_HOME") or tmp_path_factory.mktemp("vllm-plugins-home"))
    os.environ["VLLM_PLUGINS_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_llama(plugins_home) -> Path:
    from vllm_plugins.demo_model import build_demo_model

    return build_demo_model("tiny")


@pytest.fixture(scope="session")
def tiny_qwen2(plugins_home) -> Path:
    from vllm_plugins.demo_model import build_demo_model

    return build_demo_model("tiny-qwen2")


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def tiny_model(request) -> Path:
    """Each tiny model in turn: every adapter must work on Llama and on Qwen2."""
    return request.getfixturevalue(request.param)
