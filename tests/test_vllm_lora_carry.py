"""vLLM's LoRA Triton kernels carried out of the installed vLLM, run without vLLM.

The carried folder shadows the installed vLLM on PYTHONPATH, in a subprocess, and the
kernels run in Triton's CPU interpreter against the torch reference. float16: the
interpreter computes bfloat16 tl.dot on raw bit patterns (triton-lang/triton#11584);
the bfloat16 path is the same code and is checked on a GPU.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_plugins.bench.vllm_lora import carry_vllm_lora_ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")

REPO = Path(__file__).resolve().parents[1]

_CHECK = """
import torch
import vllm
from vllm_plugins.bench.vllm_lora import VllmLoraLayer, load_vllm_lora_ops

assert vllm.__file__.startswith({dest!r}), vllm.__file__
assert load_vllm_lora_ops().carried
layer = VllmLoraLayer(hidden=64, q_size=64, kv_size=32, intermediate=96, rank=8, num_slots=2,
                      dtype=torch.float16, device="cpu")
# Slot 1 and no LoRA only: the kernels must index past slot 0, and the interpreter's
# time grows with the number of adapters in the batch.
slots = torch.where(torch.rand(128, generator=torch.Generator().manual_seed(0)) < 0.3, -1, 1)
slots[:2] = torch.tensor([-1, 1])
layer.prepare(slots)
before = {{k: v.float().clone() for k, v in layer.y.items()}}
layer.run()
for site, delta in layer.reference().items():
    got = layer.y[site].float() - before[site]
    assert got[slots < 0].abs().max() == 0, site
    err = ((got - delta).norm() / delta.norm()).item()
    assert err < 1e-2, (site, err)
    print(site, f"{{err:.1e}}")
"""


def test_carried_kernels_match_the_reference_without_vllm(tmp_path):
    dest = carry_vllm_lora_ops(tmp_path / "ops")
    assert "copied from vLLM 0.32.0" in (dest / "README.txt").read_text()
    ops = dest / "vllm" / "lora" / "ops" / "triton_ops"
    assert (ops / "__init__.py").read_text() == ""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(dest), str(REPO)]), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _CHECK.format(dest=str(dest))], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[::2] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_carry_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("# someone's own package\n")
    with pytest.raises(ValueError, match="not a carried copy"):
        carry_vllm_lora_ops(tmp_path)
