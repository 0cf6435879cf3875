"""The fixes for vLLM 0.32 bugs: tokens without a LoRA (index -1) get nothing from the CPU
LoRA ops; a worker starts in a process that has loaded numba."""

from __future__ import annotations

import subprocess
import sys

import torch

from vllm_plugins.serving.vllm_fixes import skip_lora_for_tokens_without_adapter


def test_tokens_without_a_lora_get_no_lora_from_the_last_slot():
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    skip_lora_for_tokens_without_adapter()
    x = torch.randn(4, 6)
    weights = torch.randn(2, 3, 6)  # two LoRA slots, both in use, rank 3
    index = torch.tensor([0, -1, 1, -1])
    unpatched = torch.zeros(4, 3)
    torch_ops.bgmv_shrink(x, weights, unpatched, index, 1.0)
    assert unpatched[1].abs().sum() > 0  # the bug: index -1 reads the last slot
    fixed = torch.zeros(4, 3)
    punica_cpu.bgmv_shrink(x, weights, fixed, index, 1.0)
    assert torch.equal(fixed[[0, 2]], unpatched[[0, 2]])
    assert torch.equal(fixed[[1, 3]], torch.zeros(2, 3))

    seq_start, seq_len, seq_index = torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([-1, 1])
    fixed = torch.zeros(4, 3)
    punica_cpu.sgmv_shrink(x, weights, fixed, seq_start, seq_len, seq_index, 2, 2, 4, 1.0)
    assert torch.equal(fixed[:2], torch.zeros(2, 3))
    assert torch.equal(fixed[2:], unpatched[2:])


REGISTER_CPU_KERNELS_AFTER_NUMBA = """
import numba  # loads llvmlite
from vllm.platforms import current_platform
from vllm_plugins.serving.vllm_fixes import hide_llvmlite_from_the_kernel_scan
if sys.argv[1] == "fixed":
    hide_llvmlite_from_the_kernel_scan()
current_platform.register_triton_kernel_overrides()  # what a worker does at start-up
"""


def run_kernel_registration(variant: str) -> subprocess.CompletedProcess:
    """In a fresh process: registration rebinds vLLM's kernels process-wide."""
    script = "import sys\n" + REGISTER_CPU_KERNELS_AFTER_NUMBA
    return subprocess.run([sys.executable, "-c", script, variant], capture_output=True, text=True, timeout=300)


def test_cpu_kernels_register_in_a_process_that_loaded_numba():
    unfixed = run_kernel_registration("unfixed")
    assert unfixed.returncode != 0 and "_lib_fn_wrapper" in unfixed.stderr  # the bug
    fixed = run_kernel_registration("fixed")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
