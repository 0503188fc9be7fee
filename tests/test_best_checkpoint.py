"""checkpoint-best: the held-out evaluation after training began that scores highest on --metric-for-best keeps
its model (real runs of the tiny model), pruning never deletes it, --resume keeps the best so far, and the run
ends with one plain line saying whether training made held-out retrieval worse."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from minigrace.checkpoint import verify_checkpoint
from minigrace.config import parse_args
from minigrace.train import best_line, main

# lr 3e-3 moves the tiny model within 4 steps: held-out nDCG@10 rises, then falls before the end
EVALUATED = ["--max-steps", "4", "--batch-size", "4", "--mini-batch-size", "2", "--group-size", "2",
             "--max-new-tokens", "8", "--eval-size", "16", "--eval-every", "1", "--lr", "3e-3"]


def _weights(checkpoint):
    return load_file(os.path.join(checkpoint, "model.safetensors"))


def _same_weights(a, b):
    a, b = _weights(a), _weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _evals(run_dir):
    """step → eval_ndcg@10 of the evaluations after training began."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["eval_ndcg@10"] for r in rows if "eval_ndcg@10" in r and r["step"] > 0}


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory, one_thread):
    """A run that evaluates after every step and saves every step: (run dir, summary)."""
    out = tmp_path_factory.mktemp("best") / "whole"
    return out, main(parse_args(EVALUATED + ["--save-every", "1", "--out", str(out)])[0])


def test_checkpoint_best_is_the_best_evaluated_step(whole):
    out, summary = whole
    evals = _evals(out)
    assert sorted(evals) == [1, 2, 3, 4]
    best_step = max(evals, key=evals.get)  # the first of equal values: a later tie does not replace it
    assert summary["best"] == {"metric": "eval_ndcg@10", "step": best_step, "value": evals[best_step],
                               "checkpoint": str(out / "checkpoint-best")}
    assert json.load(open(out / "summary.json"))["best"] == summary["best"]
    same_step = out / ("checkpoint-final" if best_step == 4 else f"checkpoint-{best_step:06d}")
    assert _same_weights(out / "checkpoint-best", same_step)
    verify_checkpoint(str(out / "checkpoint-best"))
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-best")  # a plain transformers model, like -final


def test_keep_last_never_deletes_checkpoint_best(tiny, tmp_path, one_thread):
    out = tmp_path / "run"
    summary = main(parse_args(EVALUATED + ["--save-every", "1", "--keep-last", "1", "--out", str(out)])[0])
    evals = _evals(out)
    assert summary["best"]["step"] == max(evals, key=evals.get)
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == [
        "checkpoint-000003", "checkpoint-best", "checkpoint-final"]
    verify_checkpoint(str(out / "checkpoint-best"))


@pytest.mark.parametrize("left_behind", ["best of steps 1-2", "written after checkpoint 2"])
def test_resume_keeps_the_best_so_far(whole, tmp_path, left_behind):
    """A run that dies after its step-2 checkpoint and is resumed ends with the uninterrupted run's best. The
    crash leaves the checkpoint-best of steps 1-2 behind, or (dying before its step-3 checkpoint) a later one."""
    out, summary = whole
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(out / "config.json", crashed / "config.json")
    shutil.copytree(out / "checkpoint-000002", crashed / "checkpoint-000002")
    evals = _evals(out)
    if left_behind == "best of steps 1-2":
        best_then = max((1, 2), key=evals.get)
        shutil.copytree(out / f"checkpoint-{best_then:06d}", crashed / "checkpoint-best")
    else:
        shutil.copytree(out / "checkpoint-best", crashed / "checkpoint-best")
    cfg, run_dir = parse_args(["--resume", str(crashed)])
    resumed = main(cfg, run_dir)
    assert {k: v for k, v in resumed["best"].items() if k != "checkpoint"} == \
        {k: v for k, v in summary["best"].items() if k != "checkpoint"}
    assert _same_weights(crashed / "checkpoint-best", out / "checkpoint-best")


def test_without_eval_every_checkpoint_best_is_checkpoint_final_and_numbers_do_not_change(tiny, tmp_path, one_thread):
    """The tiny preset's --eval-every 0: no extra evaluation; the final one is the only candidate, so
    checkpoint-best is checkpoint-final, as hard links (no second copy). --metric-for-best '' logs the same rows."""
    short = [a for a in EVALUATED if a not in ("--eval-every", "1")]
    kept, none = tmp_path / "kept", tmp_path / "none"
    summary = main(parse_args(short + ["--out", str(kept)])[0])
    main(parse_args(short + ["--metric-for-best", "", "--out", str(none)])[0])
    timing = ("tokens_per_s", "rollout_time_s", "step_time_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]
            for run in (kept, none)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0] if "eval_ndcg@10" in r] == [0, 4]
    assert summary["best"]["step"] == 4 and not os.path.exists(none / "checkpoint-best")
    assert json.load(open(none / "summary.json"))["best"] is None
    best, final = (os.stat(kept / d / "model.safetensors") for d in ("checkpoint-best", "checkpoint-final"))
    assert (best.st_ino, best.st_dev) == (final.st_ino, final.st_dev)
    verify_checkpoint(str(kept / "checkpoint-best"))


@pytest.mark.parametrize("metric, untrained, final, best_step, best_value, expected", [
    ("eval_ndcg@10", 0.576, 0.424, 12, 0.612, "held-out ndcg@10 0.576 → 0.424: the model got worse than untrained; "
                                              "checkpoint-best is step 12 (0.612)"),
    ("eval_ndcg@10", 0.576, 0.601, 48, 0.640, "held-out ndcg@10 0.576 → 0.601: the final checkpoint is not the best; "
                                              "checkpoint-best is step 48 (0.640)"),
    ("eval_ndcg@10", 0.576, 0.640, 96, 0.640, "held-out ndcg@10 0.576 → 0.640: the final checkpoint is the best "
                                              "(checkpoint-best is the final step, 96)"),
    ("eval_ndcg@10", 0.576, 0.424, 12, 0.551, "held-out ndcg@10 0.576 → 0.424: the model got worse than untrained; "
                                              "checkpoint-best is step 12 (0.551), also worse than untrained"),
    ("eval_mrr@10", 0.5, 0.6, 48, 0.6, "held-out mrr@10 0.500 → 0.600: the final checkpoint ties the best; "
                                       "checkpoint-best is step 48 (0.600), the earlier one"),
], ids=["worse", "not-best", "best", "never-better", "tie"])
def test_the_end_of_run_line_says_when_the_model_got_worse(metric, untrained, final, best_step, best_value, expected):
    assert best_line(metric, untrained=untrained, final=final, final_step=96, best_step=best_step,
                     best_value=best_value) == expected


def test_an_unknown_metric_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--metric-for-best", "eval_ndcg@5"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train.py: error: --metric-for-best: ") and "eval_ndcg@10" in error
    with pytest.raises(SystemExit):  # the everyday set has no topics to name
        parse_args(["--data", "everyday", "--metric-for-best", "eval_rationale_topic_acc"])
    assert parse_args(["--eval-tasks", "builtin", "--metric-for-best", "eval_mteb_MiniGraceSTS"])[0]
    assert parse_args(["--metric-for-best", ""])[0].metric_for_best == ""
