"""The one config reader (vllm_plugins/config_reader.py) on each configuration it reads:
strict types, finite numbers, ranges, unknown keys, and a message naming the source and
every bad key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_cli
from vllm_plugins.config_reader import read_config
from vllm_plugins.deploy.ray_serve import RayServeConfig
from vllm_plugins.serving.config import PromptAdapterSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("values, message", [
    ({"max_active": True}, "max_active: Input should be a valid integer"),
    ({"max_active": "12"}, "max_active: Input should be a valid integer"),
    ({"max_soft_tokens": 10**9}, "max_soft_tokens: Input should be less than or equal to 256"),
    ({"runtime_loading": "yes"}, "runtime_loading: Input should be a valid boolean"),
    ({"runtime_loading": 1, "dir": 5}, "dir: Input should be a valid string; runtime_loading: Input should be a valid boolean"),
])
def test_prompt_adapter_settings_take_their_own_types_only(values, message):
    with pytest.raises(ValueError, match="^--additional-config prompt_adapters: " + re.escape(message)):
        PromptAdapterSettings.from_additional_config({"prompt_adapters": values})


def test_valid_settings_read_as_written():
    settings = PromptAdapterSettings.from_additional_config('{"prompt_adapters": {"max_active": 3, "runtime_loading": true}}')
    assert settings == PromptAdapterSettings(max_active=3, runtime_loading=True)
    assert PromptAdapterSettings.from_additional_config('{"prompt_adapters": null}') == PromptAdapterSettings()


@pytest.mark.parametrize("args, message", [
    ({"model": 5, "adapter_dir": "/a"}, "model: Input should be a valid string"),
    ({"model": "/m", "adapter_dir": None}, "adapter_dir: Input should be a valid string"),
    ({"model": "/m", "adapter_dir": "/a", "num_replicas": True}, "num_replicas: Input should be a valid integer"),
    ({"model": "/m", "adapter_dir": "/a", "num_cpus_per_replica": float("inf")}, "num_cpus_per_replica: Input should be a finite number"),
    ({"model": "/m", "adapter_dir": "/a", "replicas": 2}, "replicas: unknown key"),
    ({"model": "demo:nope", "adapter_dir": "/a"}, "unknown demo model preset 'nope'"),
    (["model"], "expected a mapping of settings, got list"),
])
def test_ray_serve_args_are_refused_with_a_value_error(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RayServeConfig.from_args(args)


def test_ray_serve_args_expand_paths_after_validation(monkeypatch):
    monkeypatch.setenv("ADAPTERS_ROOT", "/srv/adapters")
    config = RayServeConfig.from_args({"model": "~/m", "adapter_dir": "${ADAPTERS_ROOT}/t", "serve_args": ["--x"]})
    assert config.adapter_dir == "/srv/adapters/t" and not config.model.startswith("~") and config.serve_args == ("--x",)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("ray-serve-*.yaml")))
def test_every_shipped_ray_serve_config_reads(name):
    """configs/ray-serve-*.yaml: each application's args validate (the GPU one asks a GPU per replica)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    for application in config["applications"]:
        args = RayServeConfig.from_args(application["args"])
        assert args.num_gpus_per_replica == (1 if "gpu" in name else 0)


def test_values_that_are_not_json_are_refused():
    with pytest.raises(ValueError, match="not a JSON-like value"):
        read_config(PromptAdapterSettings, {"dir": object()}, "somewhere")


@pytest.mark.parametrize("level, ok", [("debug", True), ("10", True), ("bogus", False)])
def test_the_cli_logging_level(level, ok, tmp_path, monkeypatch):
    """A bad VLLM_PLUGINS_LOGGING_LEVEL is a clear error (exit 2), not a traceback (an
    exception would leave ``main`` and fail the test)."""
    monkeypatch.setenv("VLLM_PLUGINS_LOGGING_LEVEL", level)
    status, stderr = run_cli("loadtest", "--config", str(tmp_path / "missing.toml"), "--host", "http://127.0.0.1:9",
                             "--out", str(tmp_path / "out"))
    assert status == 2
    assert ("is not a logging level" in stderr) != ok and ("cannot read load-test config" in stderr) == ok
