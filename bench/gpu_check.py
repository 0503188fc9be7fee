"""The GPU check: what CPU tests cannot reach, most important first, in at most 6 minutes on one GPU.

    bash bench/gpu_check.sh                  # on a GPU machine, from the repo root
    python bench/gpu_check.py --list         # the checks and their time budgets (runs anywhere)
    python bench/gpu_check.py --out DIR      # results in DIR (default: $OUT, else bench/results)

Each check is a child process in its own session with its own time limit; on timeout its whole process
group is killed (SIGTERM, then SIGKILL), and any descendant that left the group too (torchrun's workers).
Each result is written to DIR/gpu_check.json as the check ends (the file is rewritten whole each time, so a
run cut short still leaves every finished check). Statuses: PASS, FAIL, PARTIAL (it ran, but what the check
needs to measure is not available), NOT RUN (a dependency is missing: never counted as a pass).

Checks, in order (budget in seconds; the budgets sum to <= 360):
  kernels          the Triton kernel tests on CUDA tensors, compiled (MINIGRACE_TEST_DEVICE=cuda)
  train_bf16       2 steps of the tiny model, bf16, cuda: the first update's max |ratio - 1| <= 1e-6
  qwen_one_step    a random-init model of Qwen2.5-1.5B's shapes (bench/configs/qwen2.5-1.5b.json, no weights),
                   the preset's micro-batch (16384 tokens) and gradient checkpointing: forward, chunked
                   log-probs, backward, AdamW; peak memory beside bench/memory_model.py's train/step phases
  grad_ckpt        the tiny model's 2 steps with --grad-checkpointing
  sharded_resume   torchrun (1 process, FSDP2): a 2-step run saving sharded checkpoints; its step-1 checkpoint
                   resumed in a fresh folder to step 2, final weights compared with the run's
  lora             2 steps with --lora-r 8
  pool_sim         bench/pool_sim.py --targets-only: the three target shapes
  vllm             --rollout vllm, NOT RUN when vllm is not installed
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 360
TINY = ["--max-steps", "2", "--batch-size", "8", "--mini-batch-size", "8", "--group-size", "4",
        "--eval-size", "16", "--save-every", "0", "--dtype", "bf16", "--device", "cuda"]
RATIO_TOLERANCE = 1e-6


def train(out: str, *extra: str, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] \
        if torchrun else [sys.executable]
    return [*launcher, "train.py", *TINY, "--out", out, *extra]


# ----------------------------------------------------------------------------- verifying a run's outputs
def first_update_ratio(out: str) -> tuple[str, str]:
    """(status, why) from step 1's first_update_ratio_dev: max |ratio - 1| over the first mini-batch's
    response tokens, before any optimizer step (minigrace/step.py update_policy)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    step1 = next((r for r in rows if r.get("step") == 1 and "first_update_ratio_dev" in r), None)
    if step1 is None:
        return "FAIL", "no step-1 row with first_update_ratio_dev in metrics.jsonl"
    worst = step1["first_update_ratio_dev"]
    status = "PASS" if worst <= RATIO_TOLERANCE else "FAIL"
    return status, f"step 1 first_update_ratio_dev = {worst:.3g} (limit {RATIO_TOLERANCE:g})"


def resumed_like_the_whole_run(whole: str, crashed: str) -> tuple[str, str]:
    """A run resumed from its step-1 sharded checkpoint (`crashed`: what a crash right after it leaves) against
    the run that never stopped: step 2 logged, and the final weights' largest difference (0 on CPU,
    tests/test_train.py::test_resume_is_bit_exact; on a GPU cuBLAS may pick other kernels, so reported)."""
    from safetensors.torch import load_file
    steps = sorted(json.loads(line)["step"] for line in open(os.path.join(crashed, "metrics.jsonl"))
                   if "reward_mean" in line)
    if steps != [2]:
        return "FAIL", f"resumed run logged steps {steps}, expected [2]"
    a, b = (load_file(os.path.join(d, "checkpoint-final", "model.safetensors")) for d in (whole, crashed))
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return "PASS", f"resumed from the sharded step-1 checkpoint to step 2; final weights differ by ≤ {worst:.3g}"


def copy_crash_leftovers(whole: str, crashed: str) -> list[str]:
    """The command that makes `crashed` hold what a crash right after checkpoint 1 leaves behind."""
    script = ("import shutil, sys; w, c = sys.argv[1:]; shutil.copytree(w + '/checkpoint-000001', "
              "c + '/checkpoint-000001'); shutil.copy(w + '/config.json', c)")
    return [sys.executable, "-c", script, whole, crashed]


# ----------------------------------------------------------------------------- the checks
def checks(tmp: str) -> list[dict]:
    """name, command(s) run one after the other, budget (s), verify(out) -> (status, why) or None."""
    out = {name: os.path.join(tmp, name) for name in ("bf16", "ckpt", "sharded", "crashed", "lora", "vllm")}
    kernel_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py"))
    return [
        dict(name="kernels", budget=80, env={"MINIGRACE_TEST_DEVICE": "cuda"},
             commands=[[sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *kernel_tests]]),
        dict(name="train_bf16", budget=40, commands=[train(out["bf16"])],
             verify=lambda: first_update_ratio(out["bf16"])),
        dict(name="qwen_one_step", budget=70, commands=[[sys.executable, "bench/gpu_check.py", "--qwen-one-step"]]),
        dict(name="grad_ckpt", budget=30, commands=[train(out["ckpt"], "--grad-checkpointing")],
             verify=lambda: first_update_ratio(out["ckpt"])),
        dict(name="sharded_resume", budget=50,
             commands=[train(out["sharded"], "--parallel", "fsdp", "--save-every", "1", torchrun=True),
                       copy_crash_leftovers(out["sharded"], out["crashed"]),
                       train(out["crashed"], torchrun=True)[:-len(TINY) - 3] + ["train.py", "--resume", out["crashed"]]],
             verify=lambda: resumed_like_the_whole_run(out["sharded"], out["crashed"])),
        dict(name="lora", budget=30, commands=[train(out["lora"], "--lora-r", "8")]),
        dict(name="pool_sim", budget=40,
             commands=[[sys.executable, "bench/pool_sim.py", "--targets-only", "--out",
                        os.path.join(tmp, "pool_sim.json")]]),
        dict(name="vllm", budget=20, needs="vllm",
             commands=[train(out["vllm"], "--rollout", "vllm", "--vllm-gpu-memory", "0.2")]),
    ]


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), including those that started their own session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group and every descendant, then SIGKILL what is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        stragglers = descendants(process.pid)
        try:
            os.killpg(process.pid, sig)  # the child leads its own group (start_new_session=True)
        except ProcessLookupError:
            pass
        for pid in stragglers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=grace_s)
            if sig == signal.SIGTERM and not descendants(process.pid):
                return
        except subprocess.TimeoutExpired:
            pass


def run_command(cmd: list[str], limit_s: float, env: dict) -> tuple[int | None, str]:
    """(exit code, or None on timeout; the output tail)."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(limit_s, 0.1))
        except subprocess.TimeoutExpired:
            kill_tree(process)
            code = None
        log.seek(0)
        return code, log.read()[-4000:].decode(errors="replace")


def run_check(check: dict) -> dict:
    name, budget = check["name"], check["budget"]
    result = dict(name=name, budget_s=budget, command=" && ".join(" ".join(c) for c in check["commands"]))
    if check.get("needs") and importlib.util.find_spec(check["needs"]) is None:
        return dict(result, status="NOT RUN", why=f"{check['needs']} is not installed", seconds=0.0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **check.get("env", {})}
    env.pop("TRITON_INTERPRET", None)  # real GPU compiles, never the interpreter
    started = time.perf_counter()
    status, why, output = "PASS", "", ""
    for cmd in check["commands"]:
        code, output = run_command(cmd, budget - (time.perf_counter() - started), env)
        if code is None:
            status, why = "FAIL", f"over its {budget} s budget: process group killed"
            break
        if code != 0:
            status, why = "FAIL", f"exit {code}"
            break
    if status == "PASS" and check.get("verify"):
        try:
            status, why = check["verify"]()
        except (OSError, ValueError, KeyError) as e:
            status, why = "FAIL", f"{type(e).__name__}: {e}"
    return dict(result, status=status, why=why, seconds=round(time.perf_counter() - started, 1), output_tail=output)


# ----------------------------------------------------------------------------- qwen2.5-1.5b shapes, one step
def qwen_one_step() -> int:
    """One training micro-batch + AdamW step of a random-init Qwen2.5-1.5B (the preset's settings), peak memory
    beside the memory model. Prints one JSON line; exit 0 when it ran and fits 80 GB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from bench.memory_model import GiB, preset_phases
    from minigrace.loss import response_logprobs

    cfg, predicted = preset_phases("qwen2.5-1.5b")  # the preset's settings and the memory model's phases
    tokens, chunk = cfg.max_tokens_per_microbatch, cfg.logprob_chunk
    config = AutoConfig.from_pretrained(ROOT / "bench" / "configs" / "qwen2.5-1.5b.json")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)  # fp32 weights, as minigrace
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows = 8  # 8 rows of 2048 tokens = the preset's 16384-token micro-batch
    ids = torch.randint(0, config.vocab_size, (rows, tokens // rows), device="cuda")
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 256:] = True  # the response positions
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state
        logprobs = response_logprobs(hidden, model.lm_head.weight, ids, mask, chunk)
        loss = -(logprobs.sum() / mask.sum())
    loss.backward()
    train_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    step_peak = torch.cuda.max_memory_allocated()
    torch.cuda.synchronize()
    report = dict(seconds=round(time.perf_counter() - started, 1), loss=float(loss),
                  measured_gib=dict(train=train_peak / GiB, step=step_peak / GiB),
                  predicted_gib=dict(train=predicted["train"] / GiB, step=predicted["step"] / GiB))
    print("QWEN_ONE_STEP " + json.dumps(report))
    return 0 if torch.isfinite(loss) and max(train_peak, step_peak) < 79 * GiB else 1


# ----------------------------------------------------------------------------- main
def write_results(path: Path, meta: dict, results: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    tmp.replace(path)  # whole file or the previous one, never half of one


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"),
                        help="folder for gpu_check.json (default: $OUT, else bench/results)")
    parser.add_argument("--list", action="store_true", help="print the checks and their budgets; run nothing")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    parser.add_argument("--qwen-one-step", action="store_true", help=argparse.SUPPRESS)  # the child of qwen_one_step
    args = parser.parse_args(argv)
    if args.qwen_one_step:
        return qwen_one_step()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        todo = [c for c in checks(tmp) if not args.only or c["name"] in args.only.split(",")]
        if args.list:
            for c in todo:
                print(f"{c['name']:<15} {c['budget']:>4} s  " + " && ".join(" ".join(x) for x in c["commands"]))
            print(f"{'total':<15} {sum(c['budget'] for c in todo):>4} s  (limit {TOTAL_BUDGET_S} s)")
            return 0
        import torch

        if not torch.cuda.is_available():
            print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); --list runs anywhere")
            return 2
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "gpu_check.json"
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                    date=time.strftime("%Y-%m-%d %H:%M"), budget_s=sum(c["budget"] for c in todo))
        results = []
        for check in todo:
            result = run_check(check)
            results.append(result)
            write_results(path, meta, results)
            print(f"{result['status']:<8} {check['name']:<15} {result['seconds']:>6.1f} s  {result['why']}", flush=True)
        print(f"wrote {path}")
    return 0 if all(r["status"] in ("PASS", "NOT RUN") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
