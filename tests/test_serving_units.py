"""Pure logic of the worker side: the step's token map, the per-step buffers, the ops'
registration, KV eviction's narrowed attention metadata, the architectures served."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims
from vllm_plugins.adapters.iapt import IaptConfig
from vllm_plugins.adapters.milora import MiloraConfig
from vllm_plugins.adapters.para import ParaConfig
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import AdapterError
from vllm_plugins.eviction.query_moments import RopeTable
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.methods import check_limits
from vllm_plugins.serving import ops
from vllm_plugins.serving.batch import StepBatch
from vllm_plugins.serving.kv_eviction import KvEviction
from vllm_plugins.serving.layers import install_plugin_layers
from vllm_plugins.serving.metadata import PromptAwareMetadata


def _batch() -> StepBatch:
    # row 0: a 10-token prompt's second chunk (positions 4..9); row 1: decoding at position 7
    # of a 5-token prompt; row 2: a fresh 3-token prompt, whole
    return StepBatch(["a", "b", "c"], np.array([6, 1, 3]), np.array([4, 7, 0]), np.array([10, 5, 3]))


def test_step_batch_maps_tokens_to_rows_positions_and_roles():
    batch = _batch()
    assert batch.token_row.tolist() == [0] * 6 + [1] + [2] * 3
    assert batch.positions.tolist() == [4, 5, 6, 7, 8, 9, 7, 0, 1, 2]
    assert batch.is_prompt.tolist() == [True] * 6 + [False] + [True] * 3
    assert batch.is_adapted.tolist() == [False] * 5 + [True, True, False, False, True]
    assert batch.completes_prompt.tolist() == [True, False, True]
    assert batch.restarts.tolist() == [False, False, True]
    assert batch.prompt_tail(0, 8) == (0, 6, 2)  # positions 4..9 are the window's last 6 of 8 (2..9)
    assert batch.prompt_tail(1, 4)[1] == 0  # decoding: nothing of the prompt now
    assert batch.prompt_tail(2, 2) == (8, 2, 0)


def test_metadata_update_then_clear_leaves_no_token_of_the_step():
    meta = PromptAwareMetadata(max_tokens=16, max_rows=4, num_methods=3)
    meta.row_method[[1, 3]] = torch.tensor([2, 0])
    meta.row_slot[[1, 3]] = torch.tensor([5, 7])
    rows = np.array([3, 3, -1, 1])
    meta.update(rows, np.array([True, True, True, False]), np.array([False, True, True, True]), [3])
    assert meta.token_rows[:5].tolist() == [3, 3, -1, 1, -1]
    assert meta.token_pooled[:4].tolist() == [True, True, False, False]  # a token without a row is never pooled
    assert meta.method_rows[:, :5].tolist() == [[-1, 3, -1, -1, -1], [-1] * 5, [-1, -1, -1, 1, -1]]  # adapted tokens only
    assert meta.token_slots[:5].tolist() == [7, 7, -1, 5, -1]
    assert meta.row_completes.tolist() == [False, False, False, True]
    assert meta.pooling and meta.acting == [True, False, True]
    meta.clear()
    assert (meta.token_rows == -1).all() and not meta.token_pooled.any() and not meta.row_completes.any()
    assert (meta.method_rows == -1).all() and (meta.token_slots == -1).all()
    assert not meta.pooling and meta.acting == [False, False, False]


def test_narrowed_attention_inputs_start_at_the_first_kept_block_and_leave_the_table_alone():
    eviction = KvEviction([], 0.5, RopeTable.from_angles(torch.zeros(64, 2)), block_size=32, num_heads=2, head_dim=4, max_tokens=8, max_reqs=4, dtype=torch.float32)
    table = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([128, 70], dtype=torch.int32)
    assert eviction.narrow(2, table, seq_lens) is None  # nothing evicted: vLLM's metadata as it is
    eviction.skipped_rows[0] = 2
    narrowed_table, narrowed_lens = eviction.narrow(2, table, seq_lens)
    assert narrowed_table[0, :2].tolist() == [3, 4] and narrowed_table[1].tolist() == [5, 6, 7, 0]
    assert narrowed_lens.tolist() == [64, 70] and narrowed_lens.dtype == torch.int32
    assert table.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]] and seq_lens.tolist() == [128, 70]
    eviction.clear()
    assert eviction.narrow(2, table, seq_lens) is None


def test_the_last_steps_evictions_run_before_vllm_updates_its_states():
    """vLLM's ``_update_states`` may zero or copy newly allocated blocks, some of them
    freed by the last step's evictions: those evictions must have read them first, and
    the requests gone since must be dropped before they run."""
    from types import SimpleNamespace

    from vllm_plugins.serving.runner import PluginRunnerMixin

    calls = []

    class VllmRunner:
        def _update_states(self, scheduler_output):
            calls.append("vllm updates its states")

    class Runner(PluginRunnerMixin, VllmRunner):
        pass

    runner = Runner()
    runner.prompt_aware = SimpleNamespace(release=lambda gone: calls.append(("adapter rows released", gone)))
    runner.kv_eviction = SimpleNamespace(finish_last_step=lambda gone: calls.append(("evictions", gone)))
    runner._update_states(SimpleNamespace(finished_req_ids={"a"}, preempted_req_ids={"b"}))
    assert calls == [("adapter rows released", {"a", "b"}), ("evictions", {"a", "b"}), "vllm updates its states"]


def test_ops_are_registered_opaque_with_their_mutation_declared():
    apply = ops.prompt_aware_apply.default._schema
    assert [a.name for a in apply.arguments if a.alias_info is not None and a.alias_info.is_write] == ["out"]
    for op in (ops.prompt_aware_prefill, ops.kv_eviction_capture):
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in op.default._schema.arguments)
    with torch._subclasses.fake_tensor.FakeTensorMode():  # the fake implementations, as the compiler sees them
        dep = ops.prompt_aware_prefill(torch.empty(5, 8), 0)
        assert dep.shape == (0,)
        ops.prompt_aware_apply(torch.empty(5, 8), torch.empty(5, 12), dep, 0, 0)


def test_an_architecture_the_plugins_do_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        install_plugin_layers(nn.Module(), "GPT2LMHeadModel", Dims(8, 16, 1, 2, 1, 4), lambda attn: (attn, attn))


DIMS = Dims(hidden=16, intermediate=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("method, config, message", [
    ("iapt", IaptConfig(num_soft_tokens=5), "5 IAPT soft tokens"),
    ("iapt", IaptConfig(bottleneck=17), "IAPT bottleneck 17"),
    ("para", ParaConfig(bottleneck=10**9), "PARA bottleneck 1000000000"),
    ("milora", MiloraConfig(rank=32), "MiLoRA rank 32"),
])
def test_adapters_the_server_cannot_hold_are_refused(method, config, message):
    with pytest.raises(AdapterError, match=message):
        check_limits(method, config, DIMS, PromptAdapterSettings(max_rank=16, max_soft_tokens=4))


@pytest.mark.parametrize("method, values, message", [
    ("iapt", {"num_soft_tokens": 0}, "num_soft_tokens: Input should be greater than or equal to 1"),
    ("para", {"bottleneck": 0}, "bottleneck: Input should be greater than or equal to 1"),
    ("milora", {"rank": 0}, "rank: Input should be greater than or equal to 1"),
    ("milora", {"alpha": float("inf")}, "alpha: Input should be a finite number"),
    ("milora", {"alpha": float("nan")}, "alpha: Input should be a finite number"),
    ("milora", {"alpha": -16.0}, "alpha: Input should be greater than 0"),
    ("milora", {"rank": True, "top_k": "3"}, "rank: Input should be a valid integer; top_k: Input should be a valid integer"),
    ("lora", {"rank_pattern": {"model.layers.0.mlp.up_proj": 0}}, "rank_pattern.model.layers.0.mlp.up_proj: Input should be"),
    ("iapt", {"soft_tokens": 4}, "soft_tokens: unknown key"),
])
def test_manifest_configurations_out_of_range_are_refused_by_the_reader(method, values, message):
    """A manifest's ``config`` (or ``lora``) is read strictly: NaN, infinities, other types
    and values out of range never reach a module or the server's limits."""
    spec = METHODS[method]
    read = spec.lora_settings_from_dict if method == "lora" else spec.config_from_dict
    with pytest.raises(ValueError, match=re.escape(message)):
        read(values)


@pytest.mark.parametrize("method, config", [
    ("iapt", IaptConfig(num_soft_tokens=4, bottleneck=16)),
    ("para", ParaConfig()),
    ("milora", MiloraConfig(rank=16)),
])
def test_adapters_within_the_limits_are_accepted(method, config):
    check_limits(method, config, DIMS, PromptAdapterSettings(max_rank=16, max_soft_tokens=4))


def test_a_ticket_holds_for_its_adapter_and_directory_only(monkeypatch):
    from vllm_plugins.serving.batch import ADAPTER_PATH_ARG
    from vllm_plugins.serving.tickets import KEY_ENV, TICKET_ARG, adapter_args, verified

    monkeypatch.setenv(KEY_ENV, "k" * 64)
    args = adapter_args("para-1", "/srv/snapshots/abc")
    assert verified(args)
    assert not verified({**args, ADAPTER_PATH_ARG: "/etc"})
    assert not verified({**args, TICKET_ARG: "0" * 64})
    assert not verified({k: v for k, v in args.items() if k != TICKET_ARG})
    monkeypatch.setenv(KEY_ENV, "another server's key")
    assert not verified(args)


def test_responses_are_renamed_in_json_bodies_and_in_split_event_streams():
    import asyncio

    from vllm_plugins.serving.asgi import naming_model

    def run(start_headers, chunks):
        sent = []

        async def send(message):
            sent.append(message)

        async def go():
            wrapped = naming_model(send, "demo", "para-1")
            await wrapped({"type": "http.response.start", "status": 200, "headers": start_headers})
            for i, chunk in enumerate(chunks):
                await wrapped({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

        asyncio.run(go())
        return sent

    body = b'{"model": "demo", "choices": []}'
    sent = run([(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], [body[:10], body[10:]])
    out = b"".join(m.get("body", b"") for m in sent)
    assert json.loads(out)["model"] == "para-1"
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(out)).encode()
    stream = b'data: {"model": "demo", "n": 1}\n\ndata: {"model": "demo", "n": 2}\n\ndata: [DONE]\n\n'
    sent = run([(b"content-type", b"text/event-stream; charset=utf-8")], [stream[:20], stream[20:50], stream[50:]])
    events = b"".join(m.get("body", b"") for m in sent).split(b"\n\n")
    assert [json.loads(e[6:])["model"] for e in events if e.startswith(b"data: {")] == ["para-1", "para-1"]
    assert events[-2] == b"data: [DONE]" and sent[-1]["more_body"] is False


def test_the_vllm_xargs_keys_read_as_kv_eviction_settings():
    """The front end refuses these unless they are exactly a setting: a misspelt one would
    be ignored, and the request served with its whole cache."""
    from vllm_plugins.serving.frontend import _like_eviction_setting

    assert all(map(_like_eviction_setting, ("kv_evicton", "KV_EVICTION", "kv-keep-ratio", "kvBudget", " kv_eviction", "eviction")))
    assert not any(map(_like_eviction_setting, ("my_plugin_option", "token_budget", "keep_ratio_hint")))
