"""End to end: a short GRACE run of the tiny model writes every output the issue asks for, and the
checkpoint loads with plain transformers; a SIGTERM mid-run saves a resumable checkpoint."""
import json
import os
import signal
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from minigrace.config import parse_args
from minigrace.train import main

STEP_KEYS = {"step", "reward_mean", "reward_std", "reward_positive", "reward_negative", "reward_consistency",
             "reward_cross_group", "reward_discriminative", "advantage_abs_mean", "frac_zero_std_groups",
             "clip_frac", "kl", "loss", "response_len_mean", "emb_cross_cos_mean", "tokens_per_s", "step_time_s"}


def test_short_run_writes_metrics_samples_and_a_loadable_checkpoint(tiny, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg, _ = parse_args(["--max-steps", "3", "--batch-size", "4", "--mini-batch-size", "2", "--group-size", "4",
                         "--eval-size", "12", "--out", str(out), "--save-every", "2"])
    summary = main(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_ndcg@10" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(STEP_KEYS <= set(r) for r in steps)
    assert [r["step"] for r in evals] == [0, 3]  # before and after training
    assert all(0 <= r["eval_ndcg@10"] <= 1 and 0 <= r["eval_rationale_topic_acc"] <= 1 for r in evals)
    assert all(abs(r["reward_mean"]) < 1e3 and 0 <= r["frac_zero_std_groups"] <= 1 for r in steps)
    assert json.load(open(out / "config.json"))["max_steps"] == 3
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert samples and {"input", "rationale", "reward"} <= set(samples[0])
    assert summary["eval_before"].keys() == summary["eval_after"].keys()
    assert os.path.isdir(out / "checkpoint-000002")  # save_every
    # The final checkpoint is a plain transformers model whose weights moved away from the base.
    trained = AutoModelForCausalLM.from_pretrained(out / "checkpoint-final")
    base, _ = tiny
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert any(moved)


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "train.py", "--max-steps", "50", "--batch-size", "2", "--mini-batch-size", "2",
            "--group-size", "2", "--eval-size", "0", "--out", str(out)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training has started
        if "GRACE supervised" in line:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    saved = [d for d in os.listdir(out) if d.startswith("checkpoint-0")]
    assert len(saved) == 1 and "--resume" in output
    done = int(saved[0].split("-")[1])
    assert 1 <= done < 50
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(out)], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {out} from step {done}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "reward_mean" in line]
    assert steps == list(range(1, 51))


def test_default_run_learns(tiny, tmp_path):
    """`python train.py` as shipped (tiny preset, seed 0): reward and held-out retrieval both go up,
    and greedy rationales switch from the side topic to the text's true topic."""
    cfg, _ = parse_args(["--out", str(tmp_path / "run"), "--eval-size", "100"])
    summary = main(cfg)
    before, after = summary["eval_before"], summary["eval_after"]
    assert summary["reward_last10"] > summary["reward_first10"] + 0.1, summary
    assert after["eval_ndcg@10"] > before["eval_ndcg@10"] + 0.05, summary
    assert after["eval_rationale_topic_acc"] > before["eval_rationale_topic_acc"] + 0.3, summary
