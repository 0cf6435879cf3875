"""The decode-step harness (vllm_plugins/decode_harness): the plugins' layers, metadata and
runtime on a plain-PyTorch Llama stack, without vLLM.

* On the tiny demo model's weights it gives the reference adapters' greedy tokens (the
  transformers models of vllm_plugins/adapters), every method in one batch.
* A step compiled once serves other batches, read from the same buffers, as a captured
  CUDA graph must (the CPU's stand-in for a replay).
* ``bench decode-step --preset tiny --device cpu`` runs where vLLM cannot be imported and
  writes every method, adapter count and batch, each replay matching the eager step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from serving_fixtures import save_random_adapter
from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.adapters.storage import load_adapter
from vllm_plugins.bench.decode_step import PRESETS, PROMPT_AWARE
from vllm_plugins.decode_harness.engine import HarnessEngine, Request, greedy_tokens
from vllm_plugins.decode_harness.load import bind_runtime, build_stack
from vllm_plugins.decode_harness.lora import LoraMapping, install_lora, load_peft_lora, make_banks
from vllm_plugins.decode_harness.memory_adapters import MemoryAdapters, adapter_path
from vllm_plugins.decode_harness.model import StackConfig
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.tasks import load_task
from vllm_plugins.training.data import encode_prompt
from vllm_plugins.training.generation import greedy_generate
from vllm_plugins.training.recipes import load_base

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
NEAR_TIE = 1e-4  # answers whose reference passes a step this close to a tie are left out (docs/serving.md)


def test_harness_gives_the_reference_adapters_tokens(tiny_llama, tmp_path):
    base, tokenizer = load_base(tiny_llama)
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in load_task("reverse").train[:4]]
    methods = ("base", "lora", *PROMPT_AWARE)
    dirs = {m: save_random_adapter(m, tiny_llama, tmp_path / m, seed) for seed, m in enumerate(methods) if m != "base"}
    config = StackConfig.from_checkpoint(tiny_llama)
    model, layers = build_stack(config, 256, 4, 16, 128, torch.float32, "cpu", checkpoint=tiny_llama)
    runtime = bind_runtime(model, layers, PromptAdapterSettings(max_active=3), str(tiny_llama), 256, 32, "cpu", torch.float32)
    banks = make_banks(model, rank=8, num_slots=2, seed=0)
    load_peft_lora(dirs["lora"], banks, slot=1)
    mapping = LoraMapping(2, 256, "cpu")
    install_lora(model, banks, mapping)
    requests, expected, margins = [], [], []
    for method in methods:
        lm = PlainLM(load_base(tiny_llama)[0]) if method == "base" else load_adapter(dirs[method], load_base(tiny_llama)[0])[0]
        expected += greedy_generate(lm, prompts, NEW_TOKENS, eos_id=-1, pad_id=tokenizer.pad_token_id, margins=margins)
        for i, prompt in enumerate(prompts):
            request = Request(f"{method}-{i}", prompt, lora_slot=1 if method == "lora" else -1)
            if method in PROMPT_AWARE:
                request.adapter = (method, str(dirs[method]))
                request.soft_tokens = 4 if method == "iapt" else 0
            requests.append(request)
    with torch.no_grad():
        got = greedy_tokens(HarnessEngine(model, runtime, mapping, 128), requests, NEW_TOKENS, max_tokens=64)
    compared = [(r.req_id, g, e) for r, g, e, m in zip(requests, got, expected, margins) if m >= NEAR_TIE]
    assert len(compared) >= 0.9 * len(requests)
    assert [(name, g) for name, g, _ in compared] == [(name, e) for name, _, e in compared]
    assert runtime.compute_state_calls == len(PROMPT_AWARE) * len(prompts) * config.dims.num_layers


def test_a_step_compiled_once_serves_other_batches_from_the_buffers(monkeypatch):
    """Every method and stock LoRA in one batch: the step compiled for one batch, called for
    batches of other requests (other rows, slots, positions and adapters), equals the eager
    step on each, without compiling again."""
    preset = PRESETS["tiny"]
    model, layers = build_stack(preset.config, 64, 2, 16, 64, torch.float32, "cpu", seed=0)
    adapters = MemoryAdapters(preset.config.dims, PROMPT_AWARE, generators=2, seed=1)
    runtime = bind_runtime(model, layers, PromptAdapterSettings(max_active=6), "", 64, 32, "cpu", torch.float32, adapters.read)
    mapping = LoraMapping(3, 64, "cpu")
    install_lora(model, make_banks(model, rank=8, num_slots=3, seed=2), mapping)
    engine = HarnessEngine(model, runtime, mapping, 64)
    gen = torch.Generator().manual_seed(0)
    requests = []
    for i in range(16):
        prompt = torch.randint(preset.config.vocab_size, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
        request = Request(f"r{i}", prompt.tolist(), lora_slot=i % 3 if i % 4 == 3 else -1)
        if i % 4 < 3:
            method = PROMPT_AWARE[i % 4]
            request.adapter = (f"{method}-{i % 2}", adapter_path(method, i % 2))
            request.soft_tokens = 4 if method == "iapt" else 0
        requests.append(request)
    engine.admit(requests, 13)
    engine.prefill(requests, 64)
    step = torch.compile(engine.decode_logits)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for batch in ([0, 1, 2, 3, 4, 5], [9, 14, 7, 8, 15, 10], [3, 2, 1, 0, 13, 12]):
        engine.begin_decode([requests[i] for i in batch])
        compiled, eager = step(len(batch)), engine.decode_logits(len(batch))
        engine.end_step()
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not np.isnan(compiled.numpy()).any()


_WITHOUT_VLLM = """
import sys

class NoVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"vLLM is not installed here ({name})")

sys.meta_path.insert(0, NoVllm())
from vllm_plugins.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_decode_step_runs_without_vllm_and_replays_match_eager(tmp_path):
    out = tmp_path / "decode-step.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]))
    result = subprocess.run([sys.executable, "-c", _WITHOUT_VLLM, "bench", "decode-step", "--json", str(out),
                             "--preset", "tiny", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    preset = PRESETS["tiny"]
    assert "torch reference" in report["lora_kernels"]
    keys = {(r["method"], r["adapters"], r["batch"]) for r in report["rows"]}
    assert keys == {(m, a, b) for m in ("base", "lora", *PROMPT_AWARE) for a in preset.adapter_counts for b in preset.batches}
    assert all(r["replays_match"] and len(r["replays"]) == preset.replays for r in report["rows"])
    for r in report["rows"]:
        assert r["distinct_adapters"] == (0 if r["method"] == "base" else min(r["batch"], r["adapters"]))
