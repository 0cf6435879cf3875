#!/usr/bin/env bash
# Issue 19's device check, one command of at most 8 minutes on a lent GPU (docs/kernels.md,
# "The device check"): the decode-step harness at 8B under CUDA graphs, each replay checked
# against eager (bench decode-step), then every Triton kernel against its reference at
# Llama-3-8B shapes and timed (bench kernels). Run from the repository root; results and
# logs go to $OUT (the device tool's folder) or ./gpu-check.
#
# Prepared where vLLM 0.32.0 is installed, before the run (both folders are git-ignored and
# travel with the run's `carry`):
#   .venv/bin/vllm-plugins bench carry-vllm-lora-ops            # .vllm_lora_ops/
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the GPU machine lacks (pydantic)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/.vllm_lora_ops:$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 290 python3 -m vllm_plugins.cli bench decode-step --preset 8b --device cuda --json "$out/decode-step.json" \
    2>&1 | tee "$out/decode-step.log"
decode=$?
timeout 170 python3 -m vllm_plugins.cli bench kernels --json "$out/kernels.json" 2>&1 | tee "$out/kernels.log"
kernels=$?
echo "bench decode-step: exit $decode (124: out of time; its JSON holds what was measured); bench kernels: exit $kernels"
[ "$decode" -eq 0 ] && [ "$kernels" -eq 0 ]
