"""The GPU check: everything on the GPU path that CPU tests cannot reach, in one run of a few minutes.

    bash bench/gpu_check.sh            # from the repo root of a fresh checkout, on a machine with a GPU

Each check is a command run in a child process with its own time limit; it passes when the command
exits 0 (and, for training runs, when its metrics say what they must). Prints PASS / FAIL / SKIP per
line and writes bench/results/gpu_check-<gpu>.json with the GPU's name, versions and every check's
output tail. Numbers from this script are GPU numbers only: never mix them with CPU tables.

Checks:
  kernels       the Triton kernel tests on CUDA tensors, compiled for real (no interpreter)
  pool_sim      bench/pool_sim.py at the GRACE shapes (kernel time, % of peak, PASS/FAIL per target)
  train_bf16    2 steps of the tiny model on cuda with bf16 autocast; the first update's ratio is 1
                (old and new log-probs agree exactly: clip_frac 0)
  device_cuda0  the same with an explicit --device cuda:0
  fsdp          torchrun --standalone, 1 process, FSDP2
  offload       the same with --offload (FSDP2 CPU offload: needs the cuda:nccl,cpu:gloo process group)
  vllm          --rollout vllm, when vllm is importable (SKIP otherwise)
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` sits beside `minigrace`
TINY = ["--max-steps", "2", "--batch-size", "8", "--mini-batch-size", "8", "--group-size", "4",
        "--eval-size", "16", "--save-every", "0", "--dtype", "bf16"]


def train(out: str, *extra: str, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] \
        if torchrun else [sys.executable]
    return [*launcher, "train.py", *TINY, "--out", out, *extra]


def first_update_exact(out: str) -> str:
    """'' when step 1's update saw ratio 1 everywhere (clip_frac 0), else what was seen."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    step1 = next(r for r in rows if r.get("step") == 1 and "clip_frac" in r)
    return "" if step1["clip_frac"] == 0 else f"step 1 clip_frac {step1['clip_frac']} (ratio ≠ 1 on the first update)"


def checks(tmp: str) -> list[tuple[str, list[str], int, object]]:
    """(name, command, time limit in s, a check of the outputs or None)."""
    out = {name: os.path.join(tmp, name) for name in ("bf16", "cuda0", "fsdp", "offload", "vllm")}
    return [
        ("kernels", [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels_pool.py",
                     "tests/test_kernels_reward.py", "tests/test_kernels_advantage.py"], 240, None),
        ("pool_sim", [sys.executable, "bench/pool_sim.py"], 240, None),
        ("train_bf16", train(out["bf16"], "--device", "cuda"), 240, lambda: first_update_exact(out["bf16"])),
        ("device_cuda0", train(out["cuda0"], "--device", "cuda:0"), 240, lambda: first_update_exact(out["cuda0"])),
        ("fsdp", train(out["fsdp"], "--parallel", "fsdp", torchrun=True), 240, None),
        ("offload", train(out["offload"], "--parallel", "fsdp", "--offload", torchrun=True), 300, None),
        ("vllm", train(out["vllm"], "--rollout", "vllm", "--vllm-gpu-memory", "0.2"), 400, None),
    ]


def run_check(name: str, cmd: list[str], limit: int, verify) -> dict:
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        return {"name": name, "status": "SKIP", "why": "vllm is not installed", "seconds": 0}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # real GPU compiles, never the interpreter
    if name == "kernels":
        env["MINIGRACE_TEST_DEVICE"] = "cuda"
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, why = ("PASS", "") if done.returncode == 0 else ("FAIL", f"exit {done.returncode}")
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status, why, output = "FAIL", f"over its {limit} s limit", (e.stdout or b"").decode(errors="replace")
    if status == "PASS" and verify is not None:
        why = verify()
        status = "FAIL" if why else "PASS"
    return {"name": name, "status": status, "why": why, "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(cmd), "output_tail": output[-4000:]}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    gpu = torch.cuda.get_device_name()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, cmd, limit, verify in checks(tmp):
            result = run_check(name, cmd, limit, verify)
            results.append(result)
            print(f"{result['status']:<5} {name:<13} {result['seconds']:>6.1f} s  {result['why']}", flush=True)
    import triton

    from bench.common import write_json
    path = write_json("gpu_check", "cuda", {"gpu": gpu, "cuda": torch.version.cuda, "triton": triton.__version__,
                                            "date": time.strftime("%Y-%m-%d")}, results)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0 if all(r["status"] != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
