"""The installed vLLM: the supported version only, and our plugin found through its entry point.

(The demo model in a vLLM engine, against transformers: tests/test_serving_engine.py.)"""

import pytest

from vllm_plugins.vllm_version import SUPPORTED_VLLM, UnsupportedVllmError, require_supported_vllm


def test_installed_vllm_is_the_supported_version():
    assert require_supported_vllm().split("+")[0] == SUPPORTED_VLLM


def test_another_vllm_version_is_refused_loudly(monkeypatch):
    import vllm_plugins.vllm_version as version

    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.31.2")
    with pytest.raises(UnsupportedVllmError, match="supports vLLM 0.32.0 only"):
        version.require_supported_vllm()


def test_general_plugin_is_found_by_vllm():
    from vllm.plugins import load_plugins_by_group

    from vllm_plugins.serving.plugin import register

    assert load_plugins_by_group("vllm.general_plugins").get("vllm_plugins") is register
