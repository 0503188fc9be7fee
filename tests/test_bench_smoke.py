"""bench/: argument parsing and a tiny in-process dry run of the loss comparison (never timed, < 10 s)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

from bench import loss_memory, train_step  # noqa: E402
from bench.common import PeakRSS, summarize  # noqa: E402


def test_loss_memory_args():
    args = loss_memory.parse_args(["--quick", "--device", "cpu"])
    assert args.token_list == [1024, 2048] and args.dtype == "fp32" and args.reps == 1
    args = loss_memory.parse_args(["--tokens", "2048,8192", "--methods", "naive,minigrace", "--device", "cpu"])
    assert args.token_list == [2048, 8192] and args.method_list == ["naive", "minigrace"]
    with pytest.raises(SystemExit):
        loss_memory.parse_args(["--methods", "nope"])


def test_train_step_args():
    args = train_step.parse_args(["--quick"])
    assert args.steps == 8 and args.warmup_steps == 1 and args.trainer_list == ["minigrace", "trl"]
    args = train_step.parse_args(["--steps", "30", "--trainers", "minigrace"])
    assert args.steps == 30 and args.eval_size == 200 and args.trainer_list == ["minigrace"]
    with pytest.raises(SystemExit):
        train_step.parse_args(["--steps", "2", "--warmup-steps", "2"])


def test_train_step_config_is_the_tiny_recipe():
    from minigrace.config import PRESETS

    cfg = train_step.make_config(train_step.parse_args(["--steps", "5"]))
    assert cfg.max_steps == 5 and cfg.model == "tiny"
    for name, value in PRESETS["tiny"].items():
        if name not in ("max_steps", "eval_size"):
            assert getattr(cfg, name) == value, name
    cfg = train_step.make_config(train_step.parse_args(["--steps", "5", "--grace-flags", "--lr 1e-4"]))
    assert cfg.lr == 1e-4


def test_loss_methods_agree_on_a_tiny_shape():
    """The benchmark's three losses are the same function: values and gradients match."""
    methods = ["naive", "minigrace"]
    try:
        import liger_kernel.chunked_loss  # noqa: F401
        methods.append("liger")
    except ImportError:
        pass
    results = {}
    for method in methods:
        x = loss_memory.make_inputs(64, 16, vocab=301, hidden_size=24, dtype=torch.float32, device="cpu")
        loss = loss_memory.make_loss(method, x, clip_eps=0.2, chunk=20, compiled=False)()
        loss.backward()
        results[method] = (loss.detach(), x["hidden"].grad, x["weight"].grad)
    ref = results["naive"]
    for method, got in results.items():
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=method)


def test_common_helpers():
    assert summarize([3.0, 1.0, 2.0]) == dict(median=2.0, p20=1.0, p80=3.0, n=3)
    assert summarize([]) == dict(median=None, p20=None, p80=None, n=0)
    with PeakRSS() as mem:
        buf = torch.ones(8 * 2**20 // 4)  # 8 MiB, touched
    assert mem.peak >= mem.before and buf.sum() > 0


def test_train_step_drives_minigrace_for_real(tiny, tmp_path, one_thread):
    """The benchmark's minigrace child (grace_step as train.py drives it) runs and reports every step."""
    args = train_step.parse_args(["--steps", "2", "--eval-size", "8", "--trainers", "minigrace"])
    result = train_step.run_minigrace(args, str(tmp_path))
    assert len(result["step_s"]) == 2 and all(math.isfinite(r) for r in result["rewards"])
    assert 0 <= result["eval"]["eval_ndcg@10"] <= 1
