"""bench/gpu_check.py on CPU: its budgets fit 6 minutes, its order, and a check past its budget is killed whole."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import gpu_check  # noqa: E402


def test_budgets_sum_to_six_minutes_most_important_first(tmp_path):
    checks = gpu_check.checks(str(tmp_path))
    assert sum(c["budget"] for c in checks) <= gpu_check.TOTAL_BUDGET_S == 360
    names = [c["name"] for c in checks]
    assert names[:2] == ["kernels", "train_bf16"] and names[-1] == "vllm"
    assert {"qwen_one_step", "grad_ckpt", "sharded_resume", "lora", "pool_sim"} <= set(names)


def test_list_runs_without_a_gpu():
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--list"], cwd=gpu_check.ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "total" in done.stdout and "(limit 360 s)" in done.stdout


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")


def test_timeout_kills_the_process_group_and_runaway_sessions(tmp_path):
    # a shell that starts a `sleep` in its group and one in a session of its own (as torchrun's workers), then waits
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; setsid sleep 300 & echo $! >> {pids}; wait"
    check = dict(name="slow", budget=2, commands=[["bash", "-c", script]])
    started = time.perf_counter()
    result = gpu_check.run_check(check)
    assert result["status"] == "FAIL" and "killed" in result["why"]
    assert time.perf_counter() - started < 20
    children = [int(x) for x in pids.read_text().split()]
    assert len(children) == 2
    deadline = time.time() + 10
    while any(alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children)


def test_missing_dependency_is_not_run_never_a_pass():
    result = gpu_check.run_check(dict(name="vllm", budget=5, needs="surely_not_installed_module_xyz",
                                      commands=[["true"]]))
    assert result["status"] == "NOT RUN" and result["seconds"] == 0


def test_first_update_ratio_reads_the_trainers_metric(tmp_path):
    """The key the trainer writes (tests/test_gpu_path.py checks its value against the loss's own inputs)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_ndcg@10": 0.1}\n{"step": 1, "clip_frac": 0.0}\n')
    assert gpu_check.first_update_ratio(str(tmp_path))[0] == "FAIL"  # no metric: never a pass
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "first_update_ratio_dev": 3e-7}\n')
    assert gpu_check.first_update_ratio(str(tmp_path))[0] == "PASS"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "first_update_ratio_dev": 2e-6}\n')
    assert gpu_check.first_update_ratio(str(tmp_path))[0] == "FAIL"