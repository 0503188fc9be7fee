"""The default run (`python train.py`) over seeds and CPU instruction sets: what varies, and by how much.

Float results depend on the instruction set torch and MKL pick (AVX-512, AVX2, baseline), and sampling turns
last-bit differences into other rationales. This script runs `python train.py --seed S --eval-tasks
MiniGraceRetrieval` for each seed under this CPU's own instruction set and under the baseline one
(`ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2`), plus the base model without a rationale on
the same mteb task, and prints mean [min, max] of every number README's default-run table and
`tests/test_train.py::test_default_run_learns` use. The test's margins come from this spread.

    python bench/default_run_spread.py                   # 3 seeds x 2 instruction sets, ~1-2 min per run
    python bench/default_run_spread.py --seeds 0 1 2 3   # more seeds; finished runs are reused (--out)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASELINE_ISA = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
TASK = "MiniGraceRetrieval"
METRICS = [  # (name in the table, where it is in summary.json)
    ("mean reward, first 10 steps → last 10", "reward_first10", "reward_last10"),
    ("held-out nDCG@10", "eval_before.eval_ndcg@10", "eval_after.eval_ndcg@10"),
    ("held-out MRR@10", "eval_before.eval_mrr@10", "eval_after.eval_mrr@10"),
    ("true-topic greedy rationales", "eval_before.eval_rationale_topic_acc", "eval_after.eval_rationale_topic_acc"),
    (f"mteb {TASK} nDCG@10", f"eval_before.eval_mteb_{TASK}", f"eval_after.eval_mteb_{TASK}"),
]


def lookup(summary: dict, path: str) -> float:
    for key in path.split("."):
        summary = summary[key]
    return summary


def isa_env(isa: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return {**env, **BASELINE_ISA} if isa == "baseline" else env


def run_default(seed: int, isa: str, out_dir: str) -> dict:
    """summary.json of `python train.py --seed seed` under `isa` (reused when it already exists)."""
    summary_path = os.path.join(out_dir, "summary.json")
    if not os.path.isfile(summary_path):
        cmd = [sys.executable, "train.py", "--seed", str(seed), "--out", out_dir, "--eval-tasks", TASK]
        print(f"{isa:>8} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, env=isa_env(isa), check=True, stdout=subprocess.DEVNULL)
    with open(summary_path) as f:
        return json.load(f)


def base_without_rationale() -> float:
    """The untrained tiny model's mteb score with plain mean pooling (no rationale), on this process's ISA."""
    from minigrace.encode import Encoder
    from minigrace.eval import MtebEncoder, builtin_tasks, run_tasks
    from minigrace.worlds.builtin import load_tiny

    encoder = MtebEncoder(Encoder(load_tiny(), max_new_tokens=16), rationale="none")
    task = [t for t in builtin_tasks() if t.metadata.name == TASK]
    return run_tasks(encoder, task, None, progress=False)[0][TASK]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]" if s["min"] != s["max"] else f"{s['mean']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--isas", nargs="+", default=["native", "baseline"], choices=["native", "baseline"])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "default_run_spread"),
                        help="run directories go here; a finished run (summary.json) is reused")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "default_run_spread_cpu.json"))
    parser.add_argument("--base-only", action="store_true", help=argparse.SUPPRESS)  # child: print the base score
    args = parser.parse_args()
    if args.base_only:
        print(json.dumps(base_without_rationale()))
        return

    import torch

    runs, base = [], {}
    for isa in args.isas:
        child = subprocess.run([sys.executable, __file__, "--base-only"], cwd=ROOT, env=isa_env(isa), check=True,
                               capture_output=True, text=True)
        base[isa] = json.loads(child.stdout.strip().splitlines()[-1])
        for seed in args.seeds:
            summary = run_default(seed, isa, os.path.join(args.out, f"{isa}-seed{seed}"))
            row = {"isa": isa, "seed": seed, "train_seconds": summary["train_seconds"]}
            for _, before, after in METRICS:
                row[before], row[after] = lookup(summary, before), lookup(summary, after)
            runs.append(row)

    table = {name: {"before": spread([r[b] for r in runs]), "after": spread([r[a] for r in runs]),
                    "gain": spread([r[a] - r[b] for r in runs])} for name, b, a in METRICS}
    table[f"mteb {TASK}: after − base without rationale"] = {
        "gain": spread([r[f"eval_after.eval_mteb_{TASK}"] - base[r["isa"]] for r in runs])}
    print(f"\n{len(runs)} runs: seeds {args.seeds} × instruction sets {args.isas} "
          f"(native here: {torch.backends.cpu.get_cpu_capability()})")
    print(f"{'':<42}{'before':>26}{'after':>26}{'after − before':>26}")
    for name, s in table.items():
        print(f"{name:<42}{fmt(s['before']) if 'before' in s else '':>26}"
              f"{fmt(s['after']) if 'after' in s else '':>26}{fmt(s['gain']):>26}")
    print(f"base without rationale, mteb {TASK}: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
    record = {"command": "python bench/default_run_spread.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                          "native_isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
              "baseline_isa_env": BASELINE_ISA, "runs": runs, "base_without_rationale": base, "table": table}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
