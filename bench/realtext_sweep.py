"""What GRACE's gain on real text depends on: SmolLM2-135M-Instruct on `--data realtext`, one change at a time.

    python bench/realtext_sweep.py                      # every point: train, score, then the table (hours)
    python bench/realtext_sweep.py --points base,unsup  # some points
    python bench/realtext_sweep.py --collect            # only the table, from the runs already under runs/

Every training point is `python train.py` with the smollm2-135m preset at 12 steps (README's SmolLM2 runs)
plus the point's flags, in runs/sweep-<point>; every point is scored on the three held-out RealText tasks by
`python -m minigrace.eval --model <checkpoint> --tasks realtext` (greedy rationales, GRACE's pooling unless
the point says otherwise). Inference points score an existing checkpoint another way (pooling, sampling);
step points score the 96-step run's intermediate checkpoints. One seed per point unless the name says.
Writes bench/results/realtext_sweep_cpu.json (scores ×100, median step time, training time, load) and prints
the table. The runs take 5-45 min each on 2 idle cores (`train_seconds` in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/realtext_sweep.py` from anywhere

from bench.common import RESULTS, check_out, environment

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--model", "smollm2-135m", "--data", "realtext", "--mode", "supervised", "--max-steps", "12",
        "--eval-size", "0"]
# name: (what it changes, train.py flags or None, the checkpoint it scores, extra eval flags)
POINTS = {
    "base": ("none: 12 steps, lr 2e-5, G=4, 16 tokens, contrastive", [], "base", []),
    "seed1": ("seed 1", ["--seed", "1"], "seed1", []),
    "seed2": ("seed 2", ["--seed", "2"], "seed2", []),
    "long96": ("96 steps (the recipe; checkpoints every 12)", ["--max-steps", "96", "--save-every", "12"], "long96", []),
    "steps24": ("24 steps (the 96-step run's checkpoint)", None, "long96/checkpoint-000024", []),
    "steps48": ("48 steps (the 96-step run's checkpoint)", None, "long96/checkpoint-000048", []),
    "steps72": ("72 steps (the 96-step run's checkpoint)", None, "long96/checkpoint-000072", []),
    "tok32": ("rationales of ≤ 32 tokens (train and encode)", ["--max-new-tokens", "32"], "tok32", []),
    "g8b4": ("G=8 rationales × 4 prompts (same 32 rollouts per step)",
             ["--group-size", "8", "--batch-size", "4", "--mini-batch-size", "2"], "g8b4", []),
    "lr1e-5": ("lr 1e-5", ["--lr", "1e-5"], "lr1e-5", []),
    "lr5e-5": ("lr 5e-5", ["--lr", "5e-5"], "lr5e-5", []),
    "unsup": ("unsupervised: the texts alone, positives are their own rationales", ["--mode", "unsupervised"],
              "unsup", []),
    "custom": ("reward: contrastive + GRACE's four terms (--reward custom)", ["--reward", "custom"], "custom", []),
    "grace": ("reward: GRACE's formula (--reward grace)", ["--reward", "grace"], "grace", []),
    "pool-rationale": ("inference: pool the rationale alone", None, "base", ["--pooling", "rationale"]),
    "pool-mix": ("inference: ½ text mean + ½ rationale mean", None, "base", ["--pooling", "mix"]),
    "sampled-t1": ("inference: sampled rationales (temperature 1, seed 0)", None, "base",
                   ["--temperature", "1.0", "--seed", "0"]),
}


def checkpoint(ref: str) -> Path:
    run, _, step = ref.partition("/")
    return ROOT / "runs" / f"sweep-{run}" / (step or "checkpoint-final")


def run_point(name: str) -> None:
    _, flags, ref, eval_flags = POINTS[name]
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    if flags is not None and not (checkpoint(ref) / "config.json").exists():
        cmd = [sys.executable, "train.py", *BASE, *flags, "--out", f"runs/sweep-{name}", "--overwrite"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "minigrace.eval", "--model", str(checkpoint(ref)), "--tasks", "realtext", "--quiet",
           "--out", f"runs/sweep-{name}/eval", *eval_flags]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def record(name: str) -> dict | None:
    """The point's scores and its training run's timing, from the files its runs left."""
    what, flags, ref, eval_flags = POINTS[name]
    scores_path = ROOT / "runs" / f"sweep-{name}" / "eval" / "scores.json"
    if not scores_path.exists():
        return None
    scores = json.loads(scores_path.read_text())
    row = {"point": name, "change": what, "train_flags": None if flags is None else BASE + flags,
           "scored": str(checkpoint(ref).relative_to(ROOT)), "eval_flags": eval_flags,
           "scores": {task: r["score"] for task, r in scores["tasks"].items()}, "average": scores["average"]["score"]}
    run = checkpoint(ref).parent
    if flags is not None and (run / "metrics.jsonl").exists():
        steps = [json.loads(line) for line in open(run / "metrics.jsonl")]
        steps = [r for r in steps if "step_time_s" in r and "reward_mean" in r]
        row.update(steps=len(steps), train_seconds=round(sum(r["step_time_s"] for r in steps), 1),
                   median_step_seconds=round(statistics.median(r["step_time_s"] for r in steps), 1))
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| change (one at a time) | s/step (median) | training | retrieval | STS | clustering | average |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["scores"]
        timing = (f"{r['median_step_seconds']:.0f} | {r['train_seconds'] / 60:.0f} min" if "train_seconds" in r
                  else "– | –")
        lines.append(f"| {r['change']} | {timing} | {s['RealTextRetrieval']:.1f} | {s['RealTextSTS']:.1f} | "
                     f"{s['RealTextClustering']:.1f} | **{r['average']:.1f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", default=",".join(POINTS), help=f"comma-separated subset of {', '.join(POINTS)}")
    p.add_argument("--collect", action="store_true", help="no training or scoring: the table from existing runs")
    p.add_argument("--out", default=str(RESULTS / "realtext_sweep_cpu.json"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.points.split(",") if n.strip()]
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        p.error(f"unknown points {unknown}; choose from {', '.join(POINTS)}")
    check_out(p, args.out)
    if not args.collect:
        for name in names:
            if POINTS[name][1] is None and not checkpoint(POINTS[name][2]).exists():
                print(f"skip {name}: {checkpoint(POINTS[name][2])} does not exist (train its run first)")
                continue
            run_point(name)
    rows = [r for r in map(record, names) if r is not None]
    Path(args.out).write_text(json.dumps({"environment": environment("cpu"), "base_flags": BASE, "points": rows},
                                         indent=1) + "\n")
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
