#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): kernels compiled for real, pool_sim at GRACE shapes, bf16 training
# steps, torchrun + FSDP2 (+ offload), vLLM rollouts when installed. Run from the repo root on a GPU
# machine whose python3 already has torch (CUDA), triton, transformers, peft and safetensors:
#     bash bench/gpu_check.sh          # ≤ 10 minutes on one H100/H200; writes bench/results/gpu_check-<gpu>.json
# The tiny model is built on first use (~1 min); carry a built one with MINIGRACE_CACHE=<dir> to skip that.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || python3 -m pip install --quiet --no-deps -e .   # minigrace itself only: nothing is downloaded
export PYTHONUNBUFFERED=1 MINIGRACE_CACHE="${MINIGRACE_CACHE:-$PWD/.cache/minigrace}"
exec python3 bench/gpu_check.py "$@"
