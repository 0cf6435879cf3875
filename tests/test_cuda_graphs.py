"""The plugins under CUDA graphs, checked on the CPU (vllm_plugins/serving/cuda_graphs.py,
gpu_model_runner.py, gpu_worker.py and the graph-safe apply path of prompt_aware.py):
which graph vLLM's dispatcher picks for a step, the second capture of every graph with
the prompt-aware kernels, the host-driven ops as splitting ops, and an apply op that reads
only device buffers and gives what the methods define, with the Triton kernels (in the
interpreter) as with the torch references."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_plugins.adapters.common.model_parts import LINEAR_MODULES, Dims
from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.adapter_slots import LoadedAdapter
from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG, StepBatch
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.cuda_graphs import HOST_DRIVEN_OPS, PluginBatchDescriptor, PluginCudagraphDispatcher, StepGraphs
from vllm_plugins.serving.gpu_model_runner import PluginGPUModelRunner
from vllm_plugins.serving.methods import LayerModules
from vllm_plugins.serving.paged_cache import paged_key_value
from vllm_plugins.serving.prompt_aware import PromptAwareRuntime
from vllm_plugins.serving.worker_mixin import PluginWorkerMixin
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG
from vllm_plugins_kernels import expert_lora, rescale, soft_kv

CAPTURE_SIZES = [1, 2, 4, 8]


def _vllm_config(mode: str = "FULL_AND_PIECEWISE", splitting_ops: list[str] | None = None):
    """The parts of a VllmConfig the dispatcher reads, as vLLM resolves them for a GPU."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode

    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=vi.CUDAGraphMode[mode],
                                    cudagraph_capture_sizes=list(CAPTURE_SIZES), splitting_ops=splitting_ops)
    compilation.set_splitting_ops_for_v1("allgather_reducescatter")
    compilation.max_cudagraph_capture_size = CAPTURE_SIZES[-1]
    return SimpleNamespace(compilation_config=compilation, num_speculative_tokens=0, lora_config=None,
                           scheduler_config=SimpleNamespace(max_num_seqs=8, async_scheduling=False))


def _dispatcher(step: StepGraphs, mode: str = "FULL_AND_PIECEWISE") -> PluginCudagraphDispatcher:
    config = _vllm_config(mode, None if mode == "FULL_AND_PIECEWISE" else [])
    dispatcher = PluginCudagraphDispatcher.for_runner(config, lambda: step)
    dispatcher.initialize_cudagraph_keys(config.compilation_config.cudagraph_mode, 1)
    return dispatcher


def test_every_graph_is_captured_without_and_with_the_prompt_aware_kernels():
    dispatcher = _dispatcher(StepGraphs(prompt_adapters=False, full_graph=True))
    plain = vi.CudagraphDispatcher(_vllm_config())
    plain.initialize_cudagraph_keys(vi.CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    for mode, keys in plain.cudagraph_keys.items():
        ours = dispatcher.cudagraph_keys[mode]
        assert keys and all(isinstance(key, PluginBatchDescriptor) for key in ours)
        for with_adapters in (False, True):
            assert {vi.BatchDescriptor(**{f: getattr(k, f) for f in vi.ATTRIBUTES["vllm.forward_context.BatchDescriptor"]})
                    for k in ours if k.prompt_adapters == with_adapters} == keys
    assert sum(len(descs) for _, descs in dispatcher.get_capture_descs()) == 2 * sum(map(len, plain.cudagraph_keys.values()))


@pytest.mark.parametrize("with_adapters", [False, True])
def test_a_decode_step_replays_the_full_graph_of_its_kind(with_adapters):
    mode, key = _dispatcher(StepGraphs(prompt_adapters=with_adapters, full_graph=True)).dispatch(3, uniform_decode=True)
    assert mode == vi.CUDAGraphMode.FULL and key.num_tokens == 4 and key.prompt_adapters == with_adapters


def test_a_step_whose_host_driven_ops_have_work_never_replays_a_full_graph():
    mode, key = _dispatcher(StepGraphs(prompt_adapters=True, full_graph=False)).dispatch(3, uniform_decode=True)
    assert mode == vi.CUDAGraphMode.PIECEWISE and key.prompt_adapters  # the splitting ops run eagerly between pieces
    mode, _ = _dispatcher(StepGraphs(prompt_adapters=True, full_graph=False), mode="FULL").dispatch(3, uniform_decode=True)
    assert mode == vi.CUDAGraphMode.NONE  # full graphs only (no pieces): the step runs eagerly
    mode, _ = _dispatcher(StepGraphs(prompt_adapters=False, full_graph=True), mode="FULL").dispatch(3, uniform_decode=True)
    assert mode == vi.CUDAGraphMode.FULL


def test_the_runner_asks_for_graphs_by_its_step_and_captures_by_the_key(monkeypatch):
    runtime = _runtime()
    eviction = SimpleNamespace(num_capture=0, narrowing=False)
    runner = object.__new__(PluginGPUModelRunner)  # vLLM's __init__ needs a GPU's config; these two are what it reads
    runner.prompt_aware, runner.kv_eviction = runtime, eviction
    assert runner.step_graphs() == StepGraphs(prompt_adapters=False, full_graph=True)
    runtime.begin_step(*_step(runtime))
    assert runner.step_graphs() == StepGraphs(prompt_adapters=True, full_graph=False)  # row 2 prefills
    runtime.end_step()
    eviction.num_capture = 3
    assert runner.step_graphs() == StepGraphs(prompt_adapters=False, full_graph=False)
    eviction.num_capture, eviction.narrowing = 0, True
    assert runner.step_graphs() == StepGraphs(prompt_adapters=False, full_graph=False)

    seen = []
    monkeypatch.setattr(vi.GPUModelRunner, "_warmup_and_capture",
                        lambda self, desc, *args: seen.append((desc.prompt_adapters, list(runtime.metadata.acting))))
    for with_adapters in (False, True):
        runner._warmup_and_capture(PluginBatchDescriptor(4, prompt_adapters=with_adapters), vi.CUDAGraphMode.FULL)
    assert seen == [(False, [False] * 3), (True, [True] * 3)] and not any(runtime.metadata.acting)


class _Worker(PluginWorkerMixin):
    """The attributes of vLLM's GPU worker the plugin worker reads."""

    def __init__(self, **attributes):
        vars(self).update(attributes)


def test_the_gpu_worker_makes_the_host_driven_ops_splitting_ops_and_refuses_what_it_cannot_serve(monkeypatch):
    from vllm_plugins.serving import gpu_worker

    monkeypatch.setattr(gpu_worker, "PluginGPUModelRunner", lambda config, device: ("runner", device))
    config = _vllm_config()
    settings = dict(device="cuda:0", use_v2_model_runner=False, cache_config=SimpleNamespace(cache_dtype="auto"),
                    speculative_config=None, kv_transfer_config=None, parallel_config=SimpleNamespace(pipeline_parallel_size=1))
    worker = _Worker(vllm_config=config, **settings)
    assert gpu_worker.PromptAwareGPUWorker._make_model_runner(worker) == ("runner", "cuda:0")
    splitting = config.compilation_config.splitting_ops
    assert splitting[-2:] == list(HOST_DRIVEN_OPS) and "vllm::unified_attention_with_output" in splitting
    gpu_worker.PromptAwareGPUWorker._make_model_runner(worker)
    assert len(splitting) == len(set(splitting))  # once
    full_only = _vllm_config("FULL", [])
    worker.vllm_config = full_only
    gpu_worker.PromptAwareGPUWorker._make_model_runner(worker)
    assert full_only.compilation_config.splitting_ops == []  # no pieces: host-driven steps run eagerly instead
    for setting, message in (({"use_v2_model_runner": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
                             ({"cache_config": SimpleNamespace(cache_dtype="fp8")}, "kv-cache-dtype fp8"),
                             ({"speculative_config": SimpleNamespace(method="ngram")}, "speculative decoding"),
                             ({"kv_transfer_config": SimpleNamespace(kv_connector="x")}, "KV transfer connector"),
                             ({"parallel_config": SimpleNamespace(pipeline_parallel_size=2)}, "pipeline parallelism")):
        with pytest.raises(RuntimeError, match=message):
            gpu_worker.PromptAwareGPUWorker._make_model_runner(_Worker(vllm_config=config, **{**settings, **setting}))
    config.scheduler_config.async_scheduling = True
    worker.vllm_config = config
    with pytest.raises(RuntimeError, match="--no-async-scheduling"):
        gpu_worker.PromptAwareGPUWorker._make_model_runner(worker)


# -- the apply op, as the graphs hold it ---------------------------------------------------
DIMS = Dims(hidden=16, intermediate=24, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4)
BLOCK_SIZE = 8


def _runtime() -> PromptAwareRuntime:
    """A runtime on one layer whose attention is a FLASH_ATTN stand-in, its tables filled
    with random per-row values; adapters are resident without being read from disk."""
    kv_cache = torch.randn(4, DIMS.num_kv_heads, BLOCK_SIZE, 2 * DIMS.head_dim)
    attn = SimpleNamespace(kv_cache=kv_cache, attn_backend=SimpleNamespace(get_name=lambda: "FLASH_ATTN"))
    settings = PromptAdapterSettings(max_active=3, max_rank=2, max_soft_tokens=4)
    runtime = PromptAwareRuntime([LayerModules(0, None, attn, DIMS, paged_key_value)], settings, "unused", max_tokens=16, max_rows=4,
                                 device=torch.device("cpu"))
    methods = {"iapt": 0, "para": 1, "milora": 2}
    runtime.slots.activate = lambda keys: {key: LoadedAdapter(key[0], key[0].split("-")[0], None, methods[key[0].split("-")[0]])
                                           for key in keys}
    para, milora = runtime.by_name["para"], runtime.by_name["milora"]
    para.qkv.uniform_(0.5, 1.5)
    para.up.uniform_(0.5, 1.5)
    milora.gates.uniform_(0.0, 1.0)
    milora.gates[0, :, 3] = 0  # o_proj's expert chosen by no request
    for module in LINEAR_MODULES:
        milora.lora_a[0][module].normal_()
        milora.lora_b[0][module].normal_()
    return runtime


def _step(runtime) -> tuple[StepBatch, dict]:
    """Row 0 decodes under IAPT (3 soft tokens), row 1 under PARA, row 2 prefills a 3-token
    prompt under MiLoRA (its last token adapted), row 3 is a base-model request."""
    args = {
        "a": {ADAPTER_ARG: "iapt-x", ADAPTER_PATH_ARG: "/x", SOFT_KV_SLOT_ARG: [2, 4, 3]},
        "b": {ADAPTER_ARG: "para-y", ADAPTER_PATH_ARG: "/y"},
        "c": {ADAPTER_ARG: "milora-z", ADAPTER_PATH_ARG: "/z"},
    }
    batch = StepBatch(["a", "b", "c", "d"], np.array([1, 1, 3, 1]), np.array([9, 6, 0, 4]), np.array([5, 6, 3, 2]))
    return batch, args


_HOST_SYNCS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim", "masked_select", "unique_consecutive"}


class _HostSyncs(TorchDispatchMode):
    """Records the aten ops that read a tensor's values on the host (what a CUDA graph
    cannot hold): ``item()`` and ``bool()`` of a tensor, ``nonzero``, ``unique``, boolean
    masks as indices. (``tolist()`` does not pass through aten: the code under test has
    none, by reading.)"""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name.startswith("index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                 for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))
        if name in _HOST_SYNCS or masks:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _apply_every_site(runtime, x_of_site, out_of_site) -> None:
    runtime.apply("qkv", 0, x_of_site["qkv"], out_of_site["qkv"])
    runtime.apply("attention", 0, x_of_site["attention"], out_of_site["attention"])
    for site in ("o_proj", "gate_up", "down"):
        runtime.apply(site, 0, x_of_site[site], out_of_site[site])


def _site_tensors(tokens: int) -> tuple[dict, dict]:
    d = DIMS
    widths = {"qkv": (d.hidden, d.q_size + 2 * d.kv_size), "attention": (d.q_size, d.q_size), "o_proj": (d.q_size, d.hidden),
              "gate_up": (d.hidden, 2 * d.intermediate), "down": (d.intermediate, d.hidden)}
    return ({s: torch.randn(tokens, w_in) for s, (w_in, _) in widths.items()},
            {s: torch.randn(tokens, w_out) for s, (_, w_out) in widths.items()})


def test_the_apply_op_reads_no_value_on_the_host(monkeypatch):
    """With the kernel launchers stubbed, everything the runtime and the methods do around
    them is device work a graph can hold; each kernel is fed every token of the step."""
    fed = []
    for module, launcher, index_at in ((rescale, "rescale_columns_torch", 1), (soft_kv, "soft_attention_paged_torch", 2),
                                       (expert_lora, "expert_lora_torch", 2)):
        monkeypatch.setattr(module, launcher, lambda *args, _name=launcher, _at=index_at: fed.append((_name, len(args[_at]))))
    runtime = _runtime()
    runtime.begin_step(*_step(runtime))
    x, out = _site_tensors(6)
    with _HostSyncs() as syncs:
        _apply_every_site(runtime, x, out)
    assert syncs.seen == []
    assert {name for name, _ in fed} == {"rescale_columns_torch", "soft_attention_paged_torch", "expert_lora_torch"}
    assert all(tokens == 6 for _, tokens in fed)
    runtime.end_step()
    fed.clear()
    _apply_every_site(runtime, x, out)
    assert fed == []  # no prompt-aware token: nothing launched (the graphs captured without adapters)


def test_the_apply_op_does_what_the_methods_define():
    runtime = _runtime()
    runtime.begin_step(*_step(runtime))
    para, milora, iapt = runtime.by_name["para"], runtime.by_name["milora"], runtime.by_name["iapt"]
    rows = {name: runtime.rows[req] for name, req in (("iapt", "a"), ("para", "b"), ("milora", "c"))}
    x, out = _site_tensors(6)
    expected = {site: t.clone() for site, t in out.items()}
    _apply_every_site(runtime, x, out)
    d = DIMS
    # PARA: token 1 (row b) rescales q and v in qkv, up in gate_up
    scales = para.qkv[0, rows["para"]]
    expected["qkv"][1, : d.q_size] *= scales[: d.q_size]
    expected["qkv"][1, d.q_size + d.kv_size :] *= scales[d.q_size :]
    expected["gate_up"][1, d.intermediate :] *= para.up[0, rows["para"]]
    # MiLoRA: token 4, the prompt's last, adds each chosen expert's delta at its columns
    columns = {"q_proj": ("qkv", 0), "k_proj": ("qkv", d.q_size), "v_proj": ("qkv", d.q_size + d.kv_size),
               "o_proj": ("o_proj", 0), "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", d.intermediate),
               "down_proj": ("down", 0)}
    for m, module in enumerate(LINEAR_MODULES):
        site, start = columns[module]
        gate = milora.gates[0, rows["milora"], m]
        if gate > 0:
            delta = milora.lora_b[0][module][2] @ (milora.lora_a[0][module][2] @ x[site][4]) * gate
            expected[site][4, start : start + delta.shape[0]] += delta
    # IAPT: token 0 attends to its 3 soft tokens at block 2, slots 4..6
    keys, values = runtime.layers[0].attn.kv_cache[2, :, 4:7].split(d.head_dim, dim=-1)
    q = x["attention"][0].view(d.num_kv_heads, 2, d.head_dim)
    weights = torch.softmax(torch.einsum("hgd,hnd->hgn", q, keys) * d.head_dim**-0.5, dim=-1)
    expected["attention"][0] += torch.einsum("hgn,hnd->hgd", weights, values).reshape(-1)
    for site in out:
        assert torch.allclose(out[site], expected[site], atol=1e-5), site
    assert iapt.runs[rows["iapt"]].tolist() == [2, 4, 3]


def test_the_triton_kernels_give_what_the_references_give_on_the_graph_path(monkeypatch):
    runtime = _runtime()
    runtime.begin_step(*_step(runtime))
    x, out = _site_tensors(6)
    with_references = {site: t.clone() for site, t in out.items()}
    _apply_every_site(runtime, x, with_references)
    for module, reference, kernel in ((rescale, "rescale_columns_torch", "rescale_columns_triton"),
                                      (soft_kv, "soft_attention_paged_torch", "soft_attention_paged_triton"),
                                      (expert_lora, "expert_lora_torch", "expert_lora_triton")):
        monkeypatch.setattr(module, reference, getattr(module, kernel))  # what the public ops launch on CUDA
    _apply_every_site(runtime, x, out)
    for site in out:
        assert torch.allclose(out[site], with_references[site], atol=1e-5), site


def test_the_step_map_sends_each_token_to_its_methods_row_and_slot():
    runtime = _runtime()
    batch, args = _step(runtime)
    runtime.begin_step(batch, args)
    meta = runtime.metadata
    a, b, c = runtime.rows["a"], runtime.rows["b"], runtime.rows["c"]
    assert meta.method_rows[:, :6].tolist() == [[a, -1, -1, -1, -1, -1], [-1, b, -1, -1, -1, -1], [-1, -1, -1, -1, c, -1]]
    assert meta.token_slots[:6].tolist() == [0, 1, 2, 2, 2, -1]
    assert meta.token_pooled[:6].tolist() == [False, False, True, True, True, False] and meta.row_completes[c]
    assert meta.pooling and meta.acting == [True, True, True]
    runtime.end_step()
    assert (meta.method_rows == -1).all() and not meta.pooling and not any(meta.acting)
