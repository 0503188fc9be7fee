"""config.py: CLI generated from the dataclass; what wins (CLI > config file > recipe > model preset >
default) as a property over every field and every preset; --recipe grace; resume; clear errors."""
import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from minigrace.config import FIELDS, GRACE_RECIPE, PRESETS, GraceConfig, parse_args

DEFAULTS = {name: f.default for name, f in FIELDS.items()}
# A valid value other than the default for every field (valid with every preset, and all together).
ANOTHER = dict(
    model="smollm2-135m", recipe="grace", data="everyday", mode="unsupervised", eval_data="held.jsonl",
    eval_fraction=0.1, eval_size=7, skip_bad_rows=True, out="runs/x", overwrite=True, seed=3, max_steps=9, epochs=3,
    device="cpu", dtype="fp32", log_every=2, report_to="tensorboard", eval_every=5, eval_tasks="builtin", save_every=7,
    metric_for_best="eval_mrr@10",
    keep_last=2, max_bad_steps=4, batch_size=32, group_size=4, mini_batch_size=8, ppo_epochs=2,
    max_tokens_per_microbatch=4096,
    max_prompt_len=512, max_new_tokens=64, temperature=0.7, aux_temperature=0.3, top_p=0.9, reward="grace",
    tau=0.05, w_positive=0.5, w_negative=0.4, w_consistency=0.3, w_cross_group=0.1, w_discriminative=2.0,
    length_penalty=-2.0, length_penalty_mode="constant", lr=2e-5, weight_decay=0.1, warmup_steps=3, grad_clip=0.5,
    clip_eps=0.1, dual_clip=2.0, kl_coef=0.05, kl_clamp=5.0, scale_std=True, logprob_chunk=256,
    grad_checkpointing=True, parallel="ddp", offload=True, rollout="vllm", rollout_rows=16, vllm_gpu_memory=0.5,
    lora_r=8, lora_alpha=16.0, lora_dropout=0.1, lora_targets="q_proj,v_proj",
)
ON_THE_COMMAND_LINE = [name for name in FIELDS if name != "config"]  # --config is tested with files


def typed(name, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    return [flag, str(value)]


def test_another_value_covers_every_field():
    assert set(ANOTHER) == set(FIELDS) - {"config"}
    assert all(ANOTHER[k] != DEFAULTS[k] for k in ANOTHER)
    GraceConfig(**ANOTHER).validate()  # valid all together (config files below use all of them at once)


def test_defaults_are_grace_values():
    cfg = GraceConfig()
    assert (cfg.group_size, cfg.tau, cfg.w_consistency, cfg.w_cross_group, cfg.clip_eps, cfg.kl_coef) == \
        (8, 0.1, 0.2, 0.2, 0.2, 0.0)
    assert (cfg.lr, cfg.batch_size, cfg.mini_batch_size, cfg.temperature, cfg.aux_temperature) == \
        (1e-6, 64, 16, 1.0, 0.5)
    assert (cfg.max_new_tokens, cfg.max_prompt_len, cfg.length_penalty, cfg.scale_std) == (2048, 1024, -1.0, False)
    assert (cfg.dual_clip, cfg.kl_clamp, cfg.recipe) == (3.0, 10.0, "minigrace")


@pytest.mark.parametrize("argv, field, expected", [  # issue #15's measurements on main before the fix
    (["--lr", "1e-6"], "lr", 1e-6),  # was 3e-4 (tiny preset)
    (["--model", "smollm2-135m", "--group-size", "8"], "group_size", 8),  # was 4
    (["--save-every", "50"], "save_every", 50),  # was 0
])
def test_a_flag_typed_at_its_default_value_is_not_dropped(argv, field, expected):
    cfg, _ = parse_args(argv)
    assert getattr(cfg, field) == expected


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_flag_beats_every_preset(preset):
    """Property: for every field and every preset, a typed flag wins, at the default value or another;
    a field not typed takes the preset's value, else the default."""
    not_given, _ = parse_args(["--model", preset])
    for name in ON_THE_COMMAND_LINE:
        if name != "model":
            assert getattr(not_given, name) == PRESETS[preset].get(name, DEFAULTS[name]), name
        for value in (DEFAULTS[name], ANOTHER[name]):
            argv = ["--model", preset, *typed(name, value)]
            if name == "mini_batch_size" and value == 16 and preset == "smollm2-135m":
                argv += ["--batch-size", "16"]  # 16 does not divide the preset's batch of 8
            cfg, _ = parse_args(argv)
            assert getattr(cfg, name) == value, (name, value)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_config_file_beats_the_preset_and_the_command_line_beats_the_file(tmp_path, fmt, preset):
    dump = yaml.safe_dump if fmt == "yaml" else json.dumps
    for label, values in (("defaults", {k: DEFAULTS[k] for k in ANOTHER}), ("another", ANOTHER)):
        path = tmp_path / f"{label}.{fmt}"
        path.write_text(dump({k: v for k, v in values.items() if k != "model"}))
        cfg, _ = parse_args(["--model", preset, "--config", str(path)])
        for name, value in values.items():
            if name != "model":
                assert getattr(cfg, name) == value, (label, name)
    if preset == "tiny":  # the command line over the file, for every field
        for name in ON_THE_COMMAND_LINE:
            cfg, _ = parse_args(["--config", str(path), *typed(name, DEFAULTS[name]),
                                 *(["--batch-size", "64"] if name == "mini_batch_size" else [])])
            assert getattr(cfg, name) == DEFAULTS[name], name


def test_the_file_can_choose_the_model_and_its_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2-135m\nlr: 1e-6\n")  # YAML 1.1 reads 1e-6 as a string: still a number here
    cfg, _ = parse_args(["--config", str(path)])
    assert cfg.model == "smollm2-135m" and cfg.group_size == 4 and cfg.lr == 1e-6
    cfg, _ = parse_args(["--config", str(path), "--model", "tiny"])
    assert cfg.model == "tiny" and cfg.group_size == 8 and cfg.batch_size == 16 and cfg.lr == 1e-6


# GRACE's training as /work/shared/grace.md §2 and §4 list it (train.sh + verl 0.4 defaults).
GRACE_PAPER = dict(reward="grace", length_penalty_mode="constant", length_penalty=-1.0, eval_fraction=0.0,
                   lr=1e-6, group_size=8, batch_size=64, mini_batch_size=16, clip_eps=0.2, kl_coef=0.0,
                   max_prompt_len=1024, max_new_tokens=2048, epochs=2, max_steps=0, tau=0.1, dual_clip=3.0,
                   kl_clamp=10.0, w_positive=1.0, w_negative=1.0, w_consistency=0.2, w_cross_group=0.2,
                   temperature=1.0, aux_temperature=0.5, top_p=1.0, weight_decay=0.01, warmup_steps=0,
                   grad_clip=1.0, ppo_epochs=1, scale_std=False, lora_r=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_recipe_grace_sets_every_grace_value_over_any_preset(preset):
    assert GRACE_RECIPE == GRACE_PAPER
    cfg, _ = parse_args(["--model", preset, "--recipe", "grace"])
    for name, value in GRACE_PAPER.items():
        assert getattr(cfg, name) == value, name
    for name, value in PRESETS[preset].items():  # memory settings are not the recipe's: the preset's stay
        if name not in GRACE_PAPER:
            assert getattr(cfg, name) == value, name


def test_recipe_precedence(tmp_path):
    cfg, _ = parse_args(["--recipe", "grace", "--lr", "2e-6", "--length-penalty-mode", "relative"])
    assert cfg.lr == 2e-6 and cfg.length_penalty_mode == "relative" and cfg.reward == "grace"
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"recipe": "grace", "batch_size": 32}))
    cfg, _ = parse_args(["--config", str(path)])
    assert cfg.recipe == "grace" and cfg.batch_size == 32 and cfg.max_new_tokens == 2048  # file > recipe
    cfg, _ = parse_args(["--config", str(path), "--recipe", "minigrace"])
    assert cfg.reward == "contrastive" and cfg.batch_size == 32 and cfg.max_new_tokens == 16  # tiny preset


def test_backbone_presets_also_apply_to_the_hf_id():
    alias, _ = parse_args(["--model", "qwen3-4b"])
    hf_id, _ = parse_args(["--model", "Qwen/Qwen3-4B-Instruct-2507"])
    assert alias.rollout_rows == hf_id.rollout_rows == PRESETS["qwen3-4b"]["rollout_rows"] > 0
    assert hf_id.grad_checkpointing and hf_id.lr == 1e-6 and hf_id.batch_size == 64


def saved_run(tmp_path, argv, drop=()) -> str:
    cfg, _ = parse_args(argv + ["--out", str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    saved = {k: v for k, v in cfg.to_dict().items() if k not in drop}
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    return str(tmp_path / "run")


def test_resume_applies_flags_typed_at_their_default_and_keeps_the_recipe(tmp_path):
    run = saved_run(tmp_path, ["--recipe", "grace", "--save-every", "0", "--max-steps", "5"])
    cfg, run_dir = parse_args(["--resume", run, "--save-every", "50"])  # 50 is the default: was dropped
    assert run_dir == run and cfg.save_every == 50 and cfg.max_steps == 5
    assert cfg.recipe == "grace" and cfg.reward == "grace" and cfg.max_new_tokens == 2048  # not the tiny preset's
    cfg, _ = parse_args(["--resume", run, "--recipe", "grace", "--lr", "1e-6"])  # the same values: no conflict
    assert cfg.lr == 1e-6


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "minigrace"], "--recipe 'grace' → 'minigrace'"),
    (["--lr", "3e-4"], "--lr 1e-06 → 0.0003"),
    (["--out", "elsewhere"], "--out with --resume"),
])
def test_resume_refuses_training_changes(tmp_path, argv, message, capsys):
    run = saved_run(tmp_path, ["--recipe", "grace"])
    with pytest.raises(SystemExit):
        parse_args(["--resume", run, *argv])
    assert message in capsys.readouterr().err


def test_a_run_saved_before_dual_clip_resumes_without_it(tmp_path):
    run = saved_run(tmp_path, [], drop=("dual_clip", "kl_clamp", "recipe"))
    cfg, _ = parse_args(["--resume", run])
    assert (cfg.dual_clip, cfg.kl_clamp, cfg.recipe) == (0.0, 0.0, "minigrace") and cfg.lr == 3e-4


def test_help_shows_the_defaults_of_the_chosen_model_and_recipe(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--model", "qwen2.5-3b", "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 80, from the qwen2.5-3b preset)" in out  # --rollout-rows
    assert "(default: contrastive; GRACE: grace)" in out
    assert "--recipe grace (the paper)" in out and "qwen3-4b --rollout-rows 20" in out
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "grace", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: grace, from --recipe grace)" in out and "(default: 16, from the tiny preset)" not in out


def test_help_lists_every_field_with_default():
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, check=True).stdout
    for name in GraceConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out
    assert "default: 0.1" in out and "--resume" in out


@pytest.mark.parametrize("flag", ["--dtype", "--reward", "--recipe", "--length-penalty-mode", "--mode",
                                  "--parallel", "--rollout"])
def test_flags_with_a_fixed_set_of_values_have_choices(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag, "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr: must be a positive number"),
    (["--tau", "0"], "--tau: must be a positive number"),
    (["--group-size", "1"], "--group-size: GRPO needs at least 2"),
    (["--batch-size", "10", "--mini-batch-size", "4"], "--mini-batch-size: must divide"),
    (["--top-p", "0"], "--top-p"),
    (["--aux-temperature", "-1"], "--aux-temperature: must be ≥ 0"),  # named --temperature before
    (["--weight-decay", "-1"], "--weight-decay: must be ≥ 0"),  # named --kl-coef before
    (["--grad-clip", "0"], "--grad-clip: must be a positive number"),  # named --kl-coef before
    (["--lora-alpha", "0"], "--lora-alpha: must be a positive number"),  # named --lora-r before
    (["--lora-dropout", "1"], "--lora-dropout: must be in [0, 1)"),
    (["--dual-clip", "0.5"], "--dual-clip: must be > 1"),
    (["--dtype", "fp16"], "--dtype: fp16 training needs loss scaling"),
    (["--batch-size", "8"], "--mini-batch-size: must divide --batch-size (8), got 16 "
                            "(--mini-batch-size 16 comes from the tiny preset)"),
])
def test_bad_values_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_bad_values_in_a_file_name_the_file_and_the_field(tmp_path, capsys):
    cases = [({"taux": 1}, "unknown config field(s) ['taux']"), ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
             ({"dtype": "fp8"}, "dtype: must be one of auto, bf16, fp16, fp32"),
             ({"max_steps": 2.5}, "max_steps: expected an integer"), ({"tau": -1}, "--tau -1.0 comes from")]
    for values, message in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(values))
        with pytest.raises(SystemExit):
            parse_args(["--config", str(path)])
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err


def test_validate_checks_types_and_choices_of_programmatic_configs():
    with pytest.raises(ValueError, match="--reward: must be one of"):
        GraceConfig(reward="infonce").validate()
    with pytest.raises(ValueError, match="--batch-size: expected an integer"):
        GraceConfig(batch_size=8.0).validate()
    assert dataclasses.replace(GraceConfig(), lr=1).validate().lr == 1  # an int is a number
