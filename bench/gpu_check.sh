#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): kernel tests compiled, the first update's ratio, one step of
# Qwen2.5-1.5B's shapes vs the memory model, grad checkpointing, sharded save + resume, LoRA, pool_sim's
# three targets, vLLM (NOT RUN when missing). Run from the repo root on a GPU machine whose python3 has
# torch (CUDA), triton, transformers, peft and safetensors:
#     bash bench/gpu_check.sh          # ≤ 6 minutes by its budgets; writes ${OUT:-bench/results}/gpu_check.json
# The tiny model ships in minigrace/worlds/tiny/: nothing is downloaded or built.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || python3 -m pip install --quiet --no-deps -e .   # minigrace itself only: nothing is downloaded
export PYTHONUNBUFFERED=1 MINIGRACE_CACHE="${MINIGRACE_CACHE:-$PWD/.cache/minigrace}"
exec python3 bench/gpu_check.py "$@"
