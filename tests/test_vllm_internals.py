"""The plugins' touch points in vLLM's internals (vllm_plugins/serving/vllm_internals.py)
exist in the installed vLLM, as the plugins use them; and the plugins' workers, runners
and CUDA graph dispatcher build on vLLM 0.32's classes (the GPU ones checked here without
a GPU: vLLM's GPU worker and V1 runner import on the CPU build)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest

from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.cuda_graphs import PluginBatchDescriptor, PluginCudagraphDispatcher
from vllm_plugins.serving.gpu_model_runner import PluginGPUModelRunner
from vllm_plugins.serving.gpu_worker import PromptAwareGPUWorker
from vllm_plugins.serving.model_runner import PluginCPUModelRunner
from vllm_plugins.serving.runner import PluginRunnerMixin
from vllm_plugins.serving.scheduler import PromptAwareScheduler
from vllm_plugins.serving.worker import PromptAwareCPUWorker
from vllm_plugins.serving.worker_mixin import PluginWorkerMixin
from vllm_plugins.vllm_version import installed_vllm_version

PLUGIN_CLASSES = (
    # each plugin class (or mixin) and the vLLM classes whose methods it overrides
    (PluginRunnerMixin, (vi.GPUModelRunner, vi.CPUModelRunner)),
    (PluginCPUModelRunner, (vi.CPUModelRunner,)),
    (PluginGPUModelRunner, (vi.GPUModelRunner,)),
    (PluginWorkerMixin, (vi.CPUWorker, vi.Worker)),
    (PromptAwareCPUWorker, (vi.CPUWorker,)),
    (PromptAwareGPUWorker, (vi.Worker,)),
    (PluginCudagraphDispatcher, (vi.CudagraphDispatcher,)),
    (PromptAwareScheduler, (vi.Scheduler,)),
)


def _overrides(cls, base) -> list[str]:
    """The methods ``cls`` itself defines that ``base`` has too."""
    return sorted(name for name, member in vars(cls).items()
                  if callable(member) and hasattr(base, name) and (name == "__init__" or not name.startswith("__")))


def _parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


PASS_THROUGH = [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]


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
    """Every method the plugins' runners, workers, dispatcher and scheduler define over
    vLLM's is listed (so the checks above cover it), apart from the plugins' own RPCs and
    helpers."""
    listed = {m for methods in vi.OVERRIDDEN.values() for m in methods}
    for cls, bases in PLUGIN_CLASSES:
        for base in bases:
            overriding = set(_overrides(cls, base))
            assert overriding <= listed, (cls.__name__, overriding - listed)


@pytest.mark.parametrize("cls, base, method", [(c, b, m) for c, bases in PLUGIN_CLASSES for b in bases
                                               for m in _overrides(c, b)])
def test_every_override_has_the_signature_of_vllms_method(cls, base, method):
    """Same parameters (names, kinds, defaults) as the vLLM method it overrides. An
    override ending in ``*args, **kwargs`` passes the rest through: its leading parameters
    are vLLM's leading ones (the mixin's ``load_model`` takes only ``*args, **kwargs``: its
    vLLM signature differs between the CPU and GPU runners)."""
    ours, theirs = _parameters(getattr(cls, method)), _parameters(getattr(base, method))
    if [kind for _, kind, _ in ours[-2:]] == PASS_THROUGH:
        ours = ours[:-2]
        theirs = theirs[: len(ours)]
    assert ours == theirs


def test_the_plugin_classes_build_on_vllms_classes():
    """The GPU worker is vLLM's GPU worker and runs the V1 runner (not Model Runner V2's
    ``vllm.v1.worker.gpu.model_runner``) with the plugins' mixin; the CPU ones likewise."""
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert (vi.Worker, vi.GPUModelRunner, vi.CudagraphDispatcher) == (Worker, GPUModelRunner, CudagraphDispatcher)
    assert issubclass(PromptAwareGPUWorker, Worker) and issubclass(PromptAwareGPUWorker, PluginWorkerMixin)
    assert PluginGPUModelRunner.__mro__[1:3] == (PluginRunnerMixin, GPUModelRunner)
    assert PluginCPUModelRunner.__mro__[1:3] == (PluginRunnerMixin, vi.CPUModelRunner)
    assert issubclass(vi.CPUModelRunner, GPUModelRunner) and issubclass(PromptAwareCPUWorker, vi.CPUWorker)
    assert issubclass(PluginCudagraphDispatcher, CudagraphDispatcher) and issubclass(PluginBatchDescriptor, vi.BatchDescriptor)
    assert inspect.signature(PromptAwareGPUWorker._make_model_runner).return_annotation in (PluginGPUModelRunner, "PluginGPUModelRunner")
    for _, bases in PLUGIN_CLASSES:
        assert all(base in vi.SUBCLASSED for base in bases)


def test_the_metadata_builders_build_from_the_narrowed_metadata_with_its_derived_cache_reset():
    """KV eviction's narrowing (a new block table and seq_lens, or None) applied to vLLM's
    CommonAttentionMetadata, whose cache of computed tokens derives from seq_lens."""
    import torch
    from vllm.v1.attention.backend import CommonAttentionMetadata

    built = []
    builder = type("Builder", (), {"build": lambda self, prefix, metadata: built.append(metadata)})()
    runner = type("Runner", (), {"attn_groups": [[type("Group", (), {"metadata_builders": [builder]})()]]})()
    vi.rewrite_attention_metadata(runner, lambda num_reqs, table, seq_lens: None if num_reqs == 1 else (table + 1, seq_lens - 1))
    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"num_reqs", "block_table_tensor", "seq_lens", "_num_computed_tokens_cache"} <= fields
    for num_reqs in (1, 2):
        values = {f: None for f in fields} | dict(num_reqs=num_reqs, block_table_tensor=torch.tensor([[1], [2]]),
                                                     seq_lens=torch.tensor([5, 6]), _num_computed_tokens_cache=torch.tensor([4, 5]))
        builder.build(0, CommonAttentionMetadata(**values))
    assert built[0].block_table_tensor.tolist() == [[1], [2]] and built[0]._num_computed_tokens_cache is not None
    assert built[1].block_table_tensor.tolist() == [[2], [3]] and built[1].seq_lens.tolist() == [4, 5]
    assert built[1]._num_computed_tokens_cache is None
