"""GraceConfig: every knob of a run in one dataclass, GRACE's values as defaults.

The command line is generated from the fields (`python train.py --help` lists them all), a YAML or
JSON file can set any of them (`--config run.yaml`), and flags given on the command line win.
Small models get a preset (a shorter, faster recipe) for the fields the user did not set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GraceConfig:
    # --- what to train on -------------------------------------------------------------------
    model: str = _f("tiny", "model: an alias (tiny, smollm2-135m, qwen2.5-1.5b, qwen2.5-3b, llama3.2-3b, "
                            "qwen3-4b), an HF id in the local cache, or a local directory")
    data: str = _f("builtin", "training data: 'builtin', 'everyday' (the shipped real-English set), a .jsonl/.json/.parquet/.txt file, or a saved `datasets` directory")
    mode: str = _f("auto", "supervised (query/positive/negative rows) or unsupervised (text rows); auto infers it",
                   choices=("auto", "supervised", "unsupervised"))
    eval_data: str = _f("", "held-out supervised data for retrieval eval (default: builtin held-out split, "
                            "or a slice of --data)")
    eval_fraction: float = _f(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    eval_size: int = _f(200, "at most this many held-out queries are evaluated")
    skip_bad_rows: bool = _f(False, "train on the valid rows and write rejected ones to <out>/rejected_rows.jsonl")

    # --- run ---------------------------------------------------------------------------------
    out: str = _f("", "run directory (default runs/<timestamp>)")
    seed: int = _f(0, "random seed (python, numpy, torch, data order, sampling)")
    max_steps: int = _f(0, "optimizer steps to run; 0 = `epochs` passes over the data")
    epochs: int = _f(2, "passes over the training data when --max-steps is 0")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    dtype: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    log_every: int = _f(1, "write a metrics row every N steps (samples every 10*N)")
    eval_every: int = _f(0, "run the held-out retrieval eval every N steps (0: only at start and end)")
    save_every: int = _f(50, "save a checkpoint every N steps (0: only at the end)")

    # --- GRPO batch ------------------------------------------------------------------------------
    batch_size: int = _f(64, "prompts per step (GRACE: 64)")
    group_size: int = _f(8, "rationales sampled per prompt, G (GRACE: 8)")
    mini_batch_size: int = _f(16, "prompts per optimizer update; batch_size/mini_batch_size updates per step")
    ppo_epochs: int = _f(1, "passes over each rollout batch")
    max_tokens_per_microbatch: int = _f(16384, "token budget of one forward/backward micro-batch")
    max_prompt_len: int = _f(1024, "prompt tokens; longer texts are right-truncated (counted in metrics)")
    max_new_tokens: int = _f(2048, "rationale length limit; a rationale cut here without EOS gets length_penalty")
    temperature: float = _f(1.0, "sampling temperature of the G main rationales")
    aux_temperature: float = _f(0.5, "temperature of the one query / negative rationale per prompt")
    top_p: float = _f(1.0, "nucleus sampling for rollouts")

    # --- reward ------------------------------------------------------------------------------
    reward: str = _f("contrastive", "contrastive: per-rollout in-batch InfoNCE (default; see README for why); "
                                    "grace: GRACE's exact formula with the --w-* weights below; custom: every --w-* weight",
                     choices=("contrastive", "grace", "custom"))
    tau: float = _f(0.1, "temperature τ dividing the cosine terms (GRACE: 0.1)")
    w_positive: float = _f(1.0, "weight of cos(query, doc)")
    w_negative: float = _f(1.0, "weight of −cos(query, hard negative)")
    w_consistency: float = _f(0.2, "weight of the mean cosine to the other rollouts of the group")
    w_cross_group: float = _f(0.2, "weight of the cross-group (in-batch negative) term")
    w_discriminative: float = _f(1.0, "weight of the in-batch InfoNCE term (contrastive and custom)")
    length_penalty: float = _f(-1.0, "penalty for a rationale truncated without EOS (see --length-penalty-mode)")
    length_penalty_mode: str = _f("relative", "relative: the group's worst complete reward + penalty (always ranks "
                                              "last); constant: the reward becomes the penalty (GRACE); none: a cut "
                                              "rationale keeps its reward (short rationale budgets, where most are cut)",
                                  choices=("relative", "constant", "none"))

    # --- policy update ---------------------------------------------------------------------------
    lr: float = _f(1e-6, "AdamW learning rate (GRACE: 1e-6, constant)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps")
    grad_clip: float = _f(1.0, "max gradient norm")
    clip_eps: float = _f(0.2, "PPO clip range ε for the ratio")
    kl_coef: float = _f(0.0, "low-variance KL to a frozen reference (GRACE: 0, no reference model is loaded)")
    scale_std: bool = _f(False, "divide group-centered advantages by the group std (GRACE: no, Dr.GRPO style)")
    logprob_chunk: int = _f(1024, "tokens per chunk when computing log-probs ([tokens, vocab] logits at most)")
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")

    config: str = _f("", "YAML or JSON file with any of these fields; command-line flags override it")

    def validate(self) -> "GraceConfig":
        """Reject bad values with a message that names the flag."""
        def bad(flag, why):
            raise ValueError(f"--{flag.replace('_', '-')}: {why}")
        for name in ("batch_size", "group_size", "mini_batch_size", "ppo_epochs", "max_prompt_len",
                     "max_new_tokens", "max_tokens_per_microbatch", "logprob_chunk", "log_every", "epochs"):
            if getattr(self, name) < 1:
                bad(name, f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "warmup_steps", "eval_size"):
            if getattr(self, name) < 0:
                bad(name, f"must be ≥ 0, got {getattr(self, name)}")
        for name in ("lr", "tau", "clip_eps"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                bad(name, f"must be a positive number, got {v}")
        if self.group_size < 2:
            bad("group_size", "GRPO needs at least 2 rationales per prompt to compare them")
        if self.batch_size < 2:
            bad("batch_size", "the cross-group and in-batch terms need at least 2 prompts per step")
        if self.batch_size % self.mini_batch_size:
            bad("mini_batch_size", f"must divide --batch-size ({self.batch_size}), got {self.mini_batch_size}")
        if self.temperature < 0 or self.aux_temperature < 0:
            bad("temperature", "temperatures must be ≥ 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.eval_fraction < 1:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.kl_coef < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            bad("kl_coef", "kl_coef and weight_decay must be ≥ 0 and grad_clip > 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Recipes for small models, applied to the fields the user did not set. GRACE's own values (the
# dataclass defaults) are meant for 1.5B-4B models on GPUs and would not move a tiny model.
PRESETS: dict[str, dict] = {
    "tiny": dict(batch_size=16, mini_batch_size=16, max_new_tokens=16, max_prompt_len=128, lr=3e-4,
                 max_steps=80, save_every=0, eval_size=200, weight_decay=0.0),
    # The CPU recipe of README's SmolLM2 table (bench/real_model.py): ~1.5-2.5 min per step on 2 busy cores.
    "smollm2-135m": dict(batch_size=8, mini_batch_size=4, group_size=4, max_new_tokens=16, max_prompt_len=256,
                         lr=2e-5, max_steps=12, save_every=0, eval_size=48, length_penalty_mode="none"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train an instruct LLM as a text encoder with GRACE (contrastive policy optimization). "
                    "With no arguments: the built-in tiny model on the built-in data, on CPU, in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(GraceConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"]
        if f.name in {k for preset in PRESETS.values() for k in preset}:
            help_ += " [" + ", ".join(f"{m}: {pre[f.name]}" for m, pre in PRESETS.items() if f.name in pre) + "]"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=help_, choices=f.metadata.get("choices"),
                           metavar=f.name.upper() if "choices" not in f.metadata else None)
    p.add_argument("--resume", default="", help="continue a run: a run directory, or 'latest' (newest under runs/)")
    return p


def _load_file(path: str) -> dict:
    with open(path) as fh:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(fh) or {}
        else:
            values = json.load(fh)
    known = {f.name for f in fields(GraceConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {unknown}")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[GraceConfig, str]:
    """CLI → (config, resume). Precedence: command line > --config file > model preset > GRACE defaults."""
    parser = _parser()
    args = parser.parse_args(argv)
    defaults = vars(parser.parse_args([]))
    explicit = {k: v for k, v in vars(args).items() if v != defaults[k]}
    resume = explicit.pop("resume", "")
    values = {f.name: f.default for f in fields(GraceConfig)}
    try:
        file_values = _load_file(explicit["config"]) if explicit.get("config") else {}
    except (OSError, ValueError) as e:
        parser.error(f"--config: {e}")
    model = explicit.get("model", file_values.get("model", values["model"]))
    values.update(PRESETS.get(model, {}))
    values.update(file_values)
    values.update(explicit)
    try:
        return GraceConfig(**values).validate(), resume
    except ValueError as e:
        parser.error(str(e))
