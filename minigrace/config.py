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
import os
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
    eval_tasks: str = _f("", "mteb tasks also scored at start, end and every --eval-every steps: 'builtin' "
                             "(offline), or task names like STS12,SciFact (their data must be in the local HF cache)")
    save_every: int = _f(50, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(0, "keep the newest N step checkpoints; older ones are deleted once the new one is "
                           "verified (0: keep all)")
    max_bad_steps: int = _f(5, "stop with a checkpoint after N consecutive steps skipped for non-finite "
                               "rewards, loss or gradients")

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

    # --- scaling out (README: "Scaling out") -----------------------------------------------------------
    parallel: str = _f("fsdp", "under torchrun: fsdp (FSDP2 fully_shard: weights, grads and AdamW states split "
                               "over ranks) or ddp (a full copy per rank); ignored on one process",
                       choices=("fsdp", "ddp"))
    offload: bool = _f(False, "with --parallel fsdp: keep the sharded weights, gradients and AdamW states in CPU "
                              "memory (FSDP2 CPUOffloadPolicy; the optimizer step runs on CPU). GRACE offloaded both")
    rollout: str = _f("hf", "rollout engine: hf (batched KV-cached sampling, runs anywhere) or vllm (GPU; weights "
                            "synced from the trainer every step; falls back to hf when vllm is not installed)",
                      choices=("hf", "vllm"))
    rollout_rows: int = _f(0, "hf rollouts: at most this many rows per batched generation (the KV cache is rows × "
                              "tokens); 0 = all of the step's rows at once. Results do not depend on it")
    vllm_gpu_memory: float = _f(0.3, "fraction of GPU memory vLLM may take for weights and KV cache (--rollout vllm)")
    lora_r: int = _f(0, "LoRA rank: train low-rank adapters (peft) instead of every weight; 0 = full fine-tuning")
    lora_alpha: float = _f(32.0, "LoRA scaling α (the update is α/r · B·A)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (0 keeps runs identical across world sizes)")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "comma-separated module names that get adapters ('all-linear': every linear but lm_head)")

    config: str = _f("", "YAML or JSON file with any of these fields; command-line flags override it")

    def validate(self) -> "GraceConfig":
        """Reject bad values with a message that names the flag."""
        def bad(flag, why):
            raise ValueError(f"--{flag.replace('_', '-')}: {why}")
        for name in ("batch_size", "group_size", "mini_batch_size", "ppo_epochs", "max_prompt_len",
                     "max_new_tokens", "max_tokens_per_microbatch", "logprob_chunk", "log_every", "epochs",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                bad(name, f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "warmup_steps", "eval_size", "keep_last",
                     "rollout_rows"):
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
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            bad("lora_r", "lora_r must be ≥ 0, lora_alpha > 0 and lora_dropout in [0, 1)")
        if not 0 < self.vllm_gpu_memory < 1:
            bad("vllm_gpu_memory", f"must be in (0, 1), got {self.vllm_gpu_memory}")
        if self.kl_coef < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            bad("kl_coef", "kl_coef and weight_decay must be ≥ 0 and grad_clip > 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Recipes for small models, applied to the fields the user did not set. GRACE's own values (the
# dataclass defaults) are meant for 1.5B-4B models on GPUs and would not move a tiny model.
PRESETS: dict[str, dict] = {
    # 2k-token micro-batches: on CPU as fast as one 12k-token batch, and the train step's peak RSS
    # drops from ~830 to ~600 MiB (bench/train_step.py).
    "tiny": dict(batch_size=16, mini_batch_size=16, max_new_tokens=16, max_prompt_len=128, lr=3e-4,
                 max_steps=80, save_every=0, eval_size=200, weight_decay=0.0, max_tokens_per_microbatch=2048),
    # The CPU recipe of README's SmolLM2 table (bench/real_model.py): ~30 s per step on 2 idle cores.
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


# What a resumed run may change: how long it runs, what it logs and evaluates, not what it trains.
# How it runs (processes, sharding, offload, rollout engine) may change too: checkpoints hold full state.
RESUMABLE = ("max_steps", "epochs", "log_every", "eval_every", "eval_tasks", "eval_size", "save_every", "keep_last",
             "max_bad_steps", "device", "parallel", "offload", "rollout", "rollout_rows", "vllm_gpu_memory")


def resume_conflicts(saved: dict, requested: dict) -> list[str]:
    """'--flag saved → requested' for each field that differs and may not change when resuming."""
    return [f"--{k.replace('_', '-')} {saved[k]!r} → {v!r}" for k, v in requested.items()
            if k in saved and k not in RESUMABLE + ("out", "config") and saved[k] != v]


def find_run(resume: str) -> str:
    """--resume RUN_DIR|latest → the run directory (it holds the config.json the run started with)."""
    if resume == "latest":
        runs = [os.path.join("runs", d) for d in os.listdir("runs")] if os.path.isdir("runs") else []
        runs = sorted((r for r in runs if os.path.exists(os.path.join(r, "config.json"))), key=os.path.getmtime)
        if not runs:
            raise ValueError("--resume latest: no run directories with a config.json under ./runs")
        return runs[-1]
    if not os.path.exists(os.path.join(resume, "config.json")):
        raise ValueError(f"--resume {resume}: not a run directory (no config.json in it)")
    return resume


def resume_config(run_dir: str, overrides: dict) -> GraceConfig:
    """The run's own config, with the command-line flags that may change on resume (RESUMABLE)."""
    with open(os.path.join(run_dir, "config.json")) as fh:
        saved = json.load(fh)
    conflicts = resume_conflicts(saved, overrides)
    if conflicts:
        raise ValueError(f"--resume {run_dir}: the run was trained with a different config: {', '.join(conflicts)}. "
                         f"Only {', '.join(RESUMABLE)} may change when resuming; start a new run for the rest")
    known = {f.name for f in fields(GraceConfig)}
    return GraceConfig(**{k: v for k, v in {**saved, **overrides, "out": run_dir}.items() if k in known}).validate()


def parse_args(argv: list[str] | None = None) -> tuple[GraceConfig, str]:
    """CLI → (config, resume run dir or ""). Precedence: command line > --config file > model preset >
    GRACE defaults; with --resume, the run's saved config plus the flags that may change (RESUMABLE)."""
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
    if resume:
        if "out" in explicit:
            parser.error("--out with --resume: a resumed run continues in its own directory")
        try:
            run_dir = find_run(resume)
            return resume_config(run_dir, {**file_values, **explicit}), run_dir
        except (OSError, ValueError) as e:
            parser.error(str(e))
    model = explicit.get("model", file_values.get("model", values["model"]))
    values.update(PRESETS.get(model, {}))
    values.update(file_values)
    values.update(explicit)
    try:
        return GraceConfig(**values).validate(), resume
    except ValueError as e:
        parser.error(str(e))
