"""config.py: CLI generated from the dataclass, presets, config files, and clear errors."""
import json
import subprocess
import sys

import pytest

from minigrace.config import PRESETS, GraceConfig, parse_args


def test_defaults_are_grace_values():
    cfg = GraceConfig()
    assert (cfg.group_size, cfg.tau, cfg.w_consistency, cfg.w_cross_group, cfg.clip_eps, cfg.kl_coef) == \
        (8, 0.1, 0.2, 0.2, 0.2, 0.0)
    assert (cfg.lr, cfg.batch_size, cfg.mini_batch_size, cfg.temperature, cfg.aux_temperature) == \
        (1e-6, 64, 16, 1.0, 0.5)
    assert (cfg.max_new_tokens, cfg.max_prompt_len, cfg.length_penalty, cfg.scale_std) == (2048, 1024, -1.0, False)


def test_preset_fills_only_what_the_user_did_not_set():
    cfg, _ = parse_args([])
    assert cfg.model == "tiny" and cfg.lr == PRESETS["tiny"]["lr"]
    cfg, _ = parse_args(["--lr", "0.5", "--max-steps", "7"])
    assert cfg.lr == 0.5 and cfg.max_steps == 7 and cfg.batch_size == PRESETS["tiny"]["batch_size"]
    cfg, _ = parse_args(["--model", "qwen2.5-1.5b"])
    assert cfg.lr == 1e-6 and cfg.batch_size == 64  # a GRACE backbone gets GRACE's values


def test_config_file_and_precedence(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"tau": 0.05, "group_size": 4}))
    cfg, _ = parse_args(["--config", str(path), "--group-size", "6"])
    assert cfg.tau == 0.05 and cfg.group_size == 6
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("reward: grace\nscale_std: true\n")
    cfg, _ = parse_args(["--config", str(yaml_path)])
    assert cfg.reward == "grace" and cfg.scale_std is True
    (tmp_path / "bad.json").write_text(json.dumps({"taux": 1}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "bad.json")])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr: must be a positive number"),
    (["--tau", "0"], "--tau: must be a positive number"),
    (["--group-size", "1"], "--group-size: GRPO needs at least 2"),
    (["--batch-size", "10", "--mini-batch-size", "4"], "--mini-batch-size: must divide"),
    (["--top-p", "0"], "--top-p"),
])
def test_bad_values_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_lists_every_field_with_default():
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, check=True).stdout
    for name in GraceConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out
    assert "default: 0.1" in out and "--resume" in out
