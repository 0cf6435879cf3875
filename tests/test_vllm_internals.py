"""The plugins' touch points in vLLM's internals (vllm_plugins/serving/vllm_internals.py)
exist in the installed vLLM, as the plugins use them."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest

from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.model_runner import PluginCPUModelRunner
from vllm_plugins.serving.runner import PluginRunnerMixin
from vllm_plugins.serving.scheduler import PromptAwareScheduler
from vllm_plugins.serving.worker import PromptAwareCPUWorker
from vllm_plugins.vllm_version import installed_vllm_version


def _resolve(path: str):
    try:
        return importlib.import_module(path)
    except ImportError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def test_the_installed_vllm_is_the_pinned_one():
    assert installed_vllm_version().split("+")[0] == vi.PINNED


@pytest.mark.parametrize("cls, method", [(c, m) for c, methods in vi.OVERRIDDEN.items() for m in methods])
def test_every_overridden_method_exists_with_the_expected_parameters(cls, method):
    assert list(inspect.signature(getattr(cls, method)).parameters) == list(vi.OVERRIDDEN[cls][method])


@pytest.mark.parametrize("owner, attribute", [(o, a) for o, attrs in vi.ATTRIBUTES.items() for a in attrs])
def test_every_internal_attribute_exists(owner, attribute):
    obj = _resolve(owner)
    if hasattr(obj, attribute):
        return
    if dataclasses.is_dataclass(obj) and attribute in {f.name for f in dataclasses.fields(obj)}:
        return
    if any(attribute in vars(c).get("__annotations__", {}) for c in inspect.getmro(obj)):
        return  # declared by the interface, set by each implementation (Platform.device_type)
    sources = [inspect.getsource(c) for c in inspect.getmro(obj) if c.__module__.startswith("vllm")]
    assert any(re.search(rf"self\.{attribute}\s*[:=]", src) for src in sources), f"{owner}.{attribute}"


def test_the_plugin_classes_override_only_listed_methods():
    """Every method the plugins' runner, worker and scheduler define over vLLM's is listed
    (so the checks above cover it), apart from the plugins' own RPCs and helpers."""
    listed = {m for methods in vi.OVERRIDDEN.values() for m in methods}
    for cls, base in ((PluginRunnerMixin, vi.GPUModelRunner), (PromptAwareCPUWorker, vi.CPUWorker),
                      (PromptAwareScheduler, vi.Scheduler)):
        overriding = {name for name in vars(cls) if callable(getattr(cls, name)) and hasattr(base, name)
                      and not name.startswith("__")}
        assert overriding <= listed, (cls.__name__, overriding - listed)
    assert issubclass(PluginCPUModelRunner, vi.CPUModelRunner) and issubclass(vi.CPUModelRunner, vi.GPUModelRunner)
