"""bench/: argument parsing and a tiny in-process dry run of the loss comparison (never timed, < 10 s)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

from bench import loss_memory, real_model, realtext_sweep, train_step  # noqa: E402
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


def test_real_model_trains_with_the_smollm2_preset(tmp_path):
    """bench/real_model.py trains with the model preset (the README recipe), only without the trainer's eval."""
    import json

    from minigrace.config import PRESETS, parse_args

    cfg, _ = parse_args(real_model.TRAIN_FLAGS)
    for name, value in PRESETS["smollm2-135m"].items():
        if name != "eval_size":  # the table's runs skip the trainer's own eval: the bench evaluates
            assert getattr(cfg, name) == value, name
    for run in ("a", "b"):  # given checkpoints are checked before anything runs (tests/test_user_errors.py)
        (tmp_path / run / "checkpoint-final").mkdir(parents=True)
        (tmp_path / run / "checkpoint-final" / "config.json").write_text("{}")
    a, b = (str(tmp_path / run / "checkpoint-final") for run in ("a", "b"))
    args = real_model.parse_args(["--supervised", a, "--unsupervised", b])
    assert args.supervised == a and args.out.endswith("real_model_cpu.json")
    assert args.data == "everyday" and args.modes == ["supervised", "unsupervised"]
    args = real_model.parse_args(["--data", "realtext", "--modes", "supervised"])
    assert args.modes == ["supervised"] and args.out.endswith("real_model_realtext_cpu.json")
    assert real_model.parse_args(["--data", "realtext", "--out", "x.json"]).out == "x.json"
    # run_record reads a run directory, also one stopped early (no summary.json)
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "resolved_mode": "supervised"}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0}, {"step": 1, "reward_mean": -2.0, "step_time_s": 10.0},
        {"step": 2, "reward_mean": -1.0, "step_time_s": 30.0}]) + "\n")
    record = real_model.run_record(str(tmp_path / "checkpoint-final"))
    assert record["steps"] == 2 and record["train_seconds"] == 40.0 and record["reward_per_step"] == [-2.0, -1.0]


def test_realtext_sweep_points_change_one_thing_each():
    """Every training point of bench/realtext_sweep.py is the 12-step smollm2-135m preset plus its own flags."""
    from minigrace.config import PRESETS, parse_args

    base, _ = parse_args(realtext_sweep.BASE)
    for name, value in PRESETS["smollm2-135m"].items():
        if name not in ("max_steps", "eval_size"):  # 12 steps, scored by minigrace.eval instead of the trainer
            assert getattr(base, name) == value, name
    assert base.max_steps == 12 and base.data == "realtext"
    for name, (_, flags, ref, eval_flags) in realtext_sweep.POINTS.items():
        if flags is not None:
            cfg, _ = parse_args(realtext_sweep.BASE + flags)
            changed = {k for k, v in cfg.to_dict().items() if v != base.to_dict()[k]} - {"seed", "save_every"}
            assert len(changed) <= 3, (name, changed)  # G and batch move together; the rest alone
        else:
            assert realtext_sweep.POINTS[ref.split("/")[0]][1] is not None  # scores a training point's run
    with pytest.raises(SystemExit):
        realtext_sweep.main(["--points", "nope", "--collect"])
