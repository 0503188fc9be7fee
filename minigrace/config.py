"""GraceConfig: every knob of a run in one dataclass, GRACE's values as defaults.

The command line is generated from the fields (`python train.py --help` lists them all, with the
defaults that the chosen --model and --recipe select). Where a value comes from, highest first:

    command line  >  --config file (YAML/JSON)  >  --recipe  >  model preset  >  dataclass default

A flag counts as given whenever it is typed, also at its default value. `--recipe grace` is GRACE's
training exactly; the default recipe (minigrace) changes three measured things (README "Recipes").
Model presets: a shorter recipe for small CPU models, memory settings for GRACE's backbones.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GraceConfig:
    # --- what to train on -------------------------------------------------------------------
    model: str = _f("tiny", "model: an alias (tiny, smollm2-135m, qwen2.5-1.5b, qwen2.5-3b, llama3.2-3b, "
                            "qwen3-4b), an HF id in the local cache, or a local directory")
    recipe: str = _f("minigrace", "minigrace: the measured defaults below; grace: the paper's training exactly (reward, "
                                  "penalty, no held-out split, lr, batch sizes, lengths, epochs; see the recipes table "
                                  "at the end)", choices=("minigrace", "grace"))
    data: str = _f("builtin", "training data: 'builtin', 'everyday' (the shipped hand-written English set), "
                              "'realtext' (3.4k real triples from Debian package descriptions and Python's docs, "
                              "held-out items apart), a .jsonl/.json/.parquet/.txt file, or a saved `datasets` "
                              "directory")
    mode: str = _f("auto", "supervised (query/positive/negative rows) or unsupervised (text rows); auto infers it",
                   choices=("auto", "supervised", "unsupervised"))
    eval_data: str = _f("", "held-out supervised data for retrieval eval (default: builtin held-out split, "
                            "or a slice of --data)")
    eval_fraction: float = _f(0.05, "fraction of --data held out for evaluation when --eval-data is not given")
    eval_size: int = _f(200, "at most this many held-out queries are evaluated")
    skip_bad_rows: bool = _f(False, "train on the valid rows and write rejected ones to <out>/rejected_rows.jsonl")

    # --- run ---------------------------------------------------------------------------------
    out: str = _f("", "run directory (default runs/<timestamp>)")
    overwrite: bool = _f(False, "start over in an existing run directory: the old run's files are removed first "
                                "(without it a run directory that holds a run is refused; --resume continues it)")
    seed: int = _f(0, "random seed (python, numpy, torch, data order, sampling)")
    max_steps: int = _f(0, "optimizer steps to run; 0 = `epochs` passes over the data")
    epochs: int = _f(2, "passes over the training data when --max-steps is 0")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    dtype: str = _f("auto", "compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32 (weights and AdamW "
                            "states stay fp32; bf16 computes under autocast, on CPU too: the GPU's dtype path). "
                            "fp16 is refused: it needs loss scaling, which minigrace does not do",
                    choices=("auto", "bf16", "fp16", "fp32"))
    log_every: int = _f(1, "write a metrics row every N steps (samples every 10*N)")
    report_to: str = _f("none", "also log every metrics row to: none, or tensorboard (event files in the run "
                                "directory, named as in metrics.jsonl; pip install \"minigrace[tensorboard]\")",
                        choices=("none", "tensorboard"))
    eval_every: int = _f(0, "run the held-out retrieval eval every N steps (0: only at start and end)")
    eval_tasks: str = _f("", "mteb tasks also scored at start, end and every --eval-every steps: 'builtin' "
                             "(offline), or task names like STS12,SciFact (their data must be in the local HF cache)")
    metric_for_best: str = _f("eval_ndcg@10", "the held-out metric (higher is better) that picks <out>/checkpoint-best "
                                              "among the evaluations after training began (--eval-every ones and "
                                              "the final one); '' = keep no checkpoint-best")
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
    lr: float = _f(1e-6, "AdamW learning rate, constant after --warmup-steps (GRACE: 1e-6)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps")
    grad_clip: float = _f(1.0, "max gradient norm")
    clip_eps: float = _f(0.2, "PPO clip range ε for the ratio")
    dual_clip: float = _f(3.0, "dual-clip PPO: a token with a negative advantage A loses at most c·|A| however far "
                               "its ratio grew (verl's clip_ratio_c; GRACE: 3); 0 = off")
    kl_coef: float = _f(0.0, "low-variance KL to a frozen reference (GRACE: 0, no reference model is loaded)")
    kl_clamp: float = _f(10.0, "upper bound on each token's k3 KL term (verl's low_var_kl clamp; GRACE: 10); 0 = none")
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
                              "tokens), and at most 64 in the held-out eval; 0 = all of the step's rows at once. "
                              "Results do not depend on it")
    vllm_gpu_memory: float = _f(0.3, "fraction of GPU memory vLLM may take for weights and KV cache (--rollout vllm)")
    lora_r: int = _f(0, "LoRA rank: train low-rank adapters (peft) instead of every weight; 0 = full fine-tuning")
    lora_alpha: float = _f(32.0, "LoRA scaling α (the update is α/r · B·A)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (0 keeps runs identical across world sizes)")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "comma-separated module names that get adapters ('all-linear': every linear but lm_head)")

    config: str = _f("", "YAML or JSON file with any of these fields; command-line flags override it")

    def validate(self) -> "GraceConfig":
        """Reject bad values with a ConfigError that names the flag."""
        def bad(name, why):
            raise ConfigError(name, why, getattr(self, name))
        for f in fields(self):  # a value from a file or a script: its type and its fixed set of values
            value = getattr(self, f.name)
            if not _has_type(value, f.type):
                bad(f.name, f"expected {_TYPE_WORDS[f.type]}, got {value!r}")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                bad(f.name, f"must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        for name in ("batch_size", "group_size", "mini_batch_size", "ppo_epochs", "max_prompt_len",
                     "max_new_tokens", "max_tokens_per_microbatch", "logprob_chunk", "log_every", "epochs",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                bad(name, f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "warmup_steps", "eval_size", "keep_last",
                     "rollout_rows", "lora_r", "kl_coef", "kl_clamp", "weight_decay", "temperature",
                     "aux_temperature"):
            if not getattr(self, name) >= 0:
                bad(name, f"must be ≥ 0, got {getattr(self, name)}")
        for name in ("lr", "tau", "clip_eps", "grad_clip", "lora_alpha"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                bad(name, f"must be a positive number, got {v}")
        if self.group_size < 2:
            bad("group_size", "GRPO needs at least 2 rationales per prompt to compare them")
        if self.batch_size < 2:
            bad("batch_size", "the cross-group and in-batch terms need at least 2 prompts per step")
        if self.batch_size % self.mini_batch_size:
            bad("mini_batch_size", f"must divide --batch-size ({self.batch_size}), got {self.mini_batch_size}")
        if self.dual_clip != 0 and not self.dual_clip > 1:
            bad("dual_clip", f"must be > 1 (GRACE: 3), or 0 for no dual clip; got {self.dual_clip}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.eval_fraction < 1:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.vllm_gpu_memory < 1:
            bad("vllm_gpu_memory", f"must be in (0, 1), got {self.vllm_gpu_memory}")
        if self.device not in ("auto", "cpu"):  # (torch is imported only here)
            from .models import device_problem
            if device_problem(self.device):
                bad("device", device_problem(self.device))
        if self.metric_for_best and self.metric_for_best not in eval_keys(self):
            bad("metric_for_best", f"not a held-out metric this run reports: use one of {', '.join(eval_keys(self))}, "
                                   f"or '' to keep no checkpoint-best")
        if self.dtype == "fp16":
            bad("dtype", "fp16 training needs loss scaling (a GradScaler) or its gradients underflow, and minigrace "
                         "does not scale losses: use bf16 (GPUs since Ampere) or fp32 (older GPUs)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A bad config value; the message starts with the flag that sets it."""

    def __init__(self, field_name: str, why: str, value=None):
        self.field, self.value = field_name, value
        super().__init__(f"{flag(field_name)}: {why}")


def eval_keys(cfg: GraceConfig) -> list[str]:
    """The eval_* metrics a run with `cfg` reports (train.evaluate), all higher-is-better: held-out retrieval,
    the rationale topic accuracy on the built-in data, and one eval_mteb_<Task> per --eval-tasks task."""
    keys = ["eval_ndcg@10", "eval_mrr@10", "eval_recall@1"] + (["eval_rationale_topic_acc"]
                                                                if cfg.data == "builtin" else [])
    names = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
    if any(name.lower() in ("builtin", "everyday", "realtext") for name in names):
        from .eval import BUILTIN_TASKS, EVERYDAY_TASKS, REALTEXT_TASKS  # (imports torch: only for an offline set)
        sets = {"builtin": BUILTIN_TASKS, "everyday": EVERYDAY_TASKS, "realtext": REALTEXT_TASKS}
        names = [task for name in names for task in sets.get(name.lower(), (name,))]
    return keys + [f"eval_mteb_{name}" for name in dict.fromkeys(names)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FIELDS = {f.name: f for f in fields(GraceConfig)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _has_type(value, typ: str) -> bool:
    if typ == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is {"int": int, "bool": bool, "str": str}[typ]


# ---------------------------------------------------------------------------------------------
# Recipes and model presets. Precedence, highest first:
#   command line > --config file > --recipe > model preset > the dataclass defaults above.
# A recipe names a training method, so it beats a model preset (`--model tiny --recipe grace` trains
# with GRACE's values, not the tiny model's); values you set yourself, in a file or a flag, beat both.

# GRACE's training, exactly (GasolSun36/GRACE train.sh + verl 0.4 defaults; /work/shared/grace.md §2, §4).
# Everything that changes what is trained; memory and speed settings are not part of it.
GRACE_RECIPE = dict(
    reward="grace", w_positive=1.0, w_negative=1.0, w_consistency=0.2, w_cross_group=0.2, tau=0.1,
    length_penalty=-1.0, length_penalty_mode="constant", eval_fraction=0.0,
    batch_size=64, group_size=8, mini_batch_size=16, ppo_epochs=1, epochs=2, max_steps=0,
    max_prompt_len=1024, max_new_tokens=2048, temperature=1.0, aux_temperature=0.5, top_p=1.0,
    lr=1e-6, weight_decay=0.01, warmup_steps=0, grad_clip=1.0, clip_eps=0.2, dual_clip=3.0,
    kl_coef=0.0, kl_clamp=10.0, scale_std=False, lora_r=0,
)
# minigrace's recipe is the dataclass defaults (GRACE's values but for the reward, the length penalty
# and a held-out split, README "Recipes") plus the model preset.
RECIPES: dict[str, dict] = {"minigrace": {}, "grace": GRACE_RECIPE}

# Model presets, for the fields the user did not set. GRACE's values (the dataclass defaults) are
# meant for 1.5B-4B models on GPUs and would not move a tiny model.
PRESETS: dict[str, dict] = {
    # 2k-token micro-batches: on CPU as fast as one 12k-token batch, and the train step's peak RSS
    # drops from ~830 to ~600 MiB (bench/train_step.py).
    "tiny": dict(batch_size=16, mini_batch_size=16, max_new_tokens=16, max_prompt_len=128, lr=3e-4,
                 max_steps=80, save_every=0, eval_size=200, weight_decay=0.0, max_tokens_per_microbatch=2048),
    # README's SmolLM2 recipe (bench/real_model.py), chosen by the realtext sweep there: ~25 s per step on 2
    # idle cores, 96 steps ≈ 44 min. Held-out retrieval still rises after 12 steps; STS and clustering do not.
    "smollm2-135m": dict(batch_size=8, mini_batch_size=4, group_size=4, max_new_tokens=16, max_prompt_len=256,
                         lr=2e-5, max_steps=96, save_every=0, eval_size=48, length_penalty_mode="none",
                         eval_every=12),
    # GRACE's backbones on one 80 GB GPU: GRACE's training, with memory settings only (they change no
    # sampled token and no update beyond float rounding). GRACE sampled on 4 H100s with vLLM and
    # trained with FSDP + CPU offload; here the peak per phase comes from bench/memory_model.py
    # (tests/test_memory_model.py keeps every preset under 76 GiB). And held-out eval every 50 steps (the
    # default --save-every: each step checkpoint has its eval; checkpoint-best picks among them): 200 queries'
    # greedy rationales cost a small fraction of a step's 512 sampled ones.
    "qwen2.5-1.5b": dict(rollout_rows=160, grad_checkpointing=True, max_tokens_per_microbatch=16384, eval_every=50),
    "qwen2.5-3b": dict(rollout_rows=80, grad_checkpointing=True, max_tokens_per_microbatch=16384, eval_every=50),
    "llama3.2-3b": dict(rollout_rows=40, grad_checkpointing=True, max_tokens_per_microbatch=16384, eval_every=50),
    "qwen3-4b": dict(rollout_rows=20, grad_checkpointing=True, max_tokens_per_microbatch=4096, eval_every=50),
}
# Why each preset differs from GRACE's values; the GiB are bench/memory_model.py's peaks on one GPU
# (tests/test_memory_model.py checks them). Unbounded = all 640 rollouts at once, no checkpointing.
PRESET_WHY = {
    "tiny": "a 0.3M-parameter model on CPU: short rationales, a high lr, 80 steps (~1 min)",
    "smollm2-135m": "SmolLM2 on CPU, README's realtext recipe (≈ 45 min on 2 cores): 16-token rationales (most are "
                    "cut: no length penalty), lr 2e-5, 96 steps",
    "qwen2.5-1.5b": "one 80 GB GPU: peak 52 GiB (unbounded: 146 GiB)",
    "qwen2.5-3b": "one 80 GB GPU: peak 63 GiB (unbounded: 200 GiB)",
    "llama3.2-3b": "one 80 GB GPU: peak 69 GiB (unbounded: 421 GiB; 8 KV heads, 4x Qwen2.5's KV cache per row)",
    "qwen3-4b": "one 80 GB GPU: peak 75 GiB at the AdamW step (unbounded: 523 GiB; fp32 weights, "
                "gradients and AdamW states alone are 60 GiB)",
}


def preset_name(model: str) -> str | None:
    """The preset for a model alias (any case) or a backbone's HF id; None for anything else."""
    if model.lower() in PRESETS:
        return model.lower()
    if model.count("/") == 1 and not os.path.exists(model):  # an HF id: the alias it stands for
        from .models import ALIASES
        return next((alias for alias, hf_id in ALIASES.items() if hf_id.lower() == model.lower()), None)
    return None


def _default_layers(model: str, recipe: str, file_path: str, file_values: dict) -> list[tuple[str, dict]]:
    """(where, values) lowest precedence first: dataclass < model preset < recipe < config file."""
    preset = preset_name(model)
    return [("default", {name: f.default for name, f in FIELDS.items()}),
            (f"the {preset} preset", PRESETS[preset] if preset else {}),
            (f"--recipe {recipe}", RECIPES[recipe]),
            (file_path, file_values)]


# ---------------------------------------------------------------------------------------------
# The command line


def _help_epilog() -> str:
    rows = [("setting", "--recipe minigrace (default)", "--recipe grace (the paper)"),
            ("--reward", "contrastive (in-batch InfoNCE)", "grace (GRACE's formula)"),
            ("--length-penalty-mode", "relative (group's worst − 1)", "constant (the reward becomes −1)"),
            ("--eval-fraction", "0.05 (held-out retrieval)", "0 (no held-out split)"),
            ("model preset's lr, batch,", "kept", "replaced by GRACE's: lr 1e-6, G 8, 64 prompts, mini-batch 16,"),
            ("lengths, steps", "", "prompt/rationale 1024/2048 tokens, 2 epochs, wd 0.01")]
    table = "\n".join(f"  {a:<27}{b:<33}{c}" for a, b, c in rows)
    presets = "\n".join(f"  {name:<14}{' '.join(_as_flag(k, v) for k, v in values.items())}\n"
                        f"  {'':<14}why: {PRESET_WHY[name]}" for name, values in PRESETS.items())
    return f"""recipes (--recipe; both keep GRACE's τ 0.1, weights 0.2/0.2, clip 0.2, dual clip 3, KL 0):
{table}
  why minigrace's choices (tiny model, 80 steps, seed 0, each flag alone; README "Recipes"):
    reward: GRACE's negative and cross-group terms are constant within a group and cancel in the
      advantage; what is left rewards alike embeddings. Held-out nDCG@10 0.079 -> 0.215 (contrastive)
      vs 0.171 (grace); rationales naming the true topic 0.17 -> 0.84 vs 0.50; cosine between
      different texts 0.84 -> 0.80 vs 0.85 -> 0.85.
    length penalty: with negative totals (InfoNCE always), a constant -1 rewards never stopping. At
      --max-new-tokens 8, rationales cut at the limit (first 10 steps -> last 10): 10% -> 67% with
      constant, 7% -> 0% with relative.
    held-out split: the reward can rise while embeddings collapse; held-out retrieval before and
      after training is the proof of learning.

precedence: command line > --config file > --recipe > model preset > defaults. A --resume'd run keeps
its own config (recipe included); only run-length, logging, eval and how-it-runs flags may change.

model presets (for the fields you do not set; the alias or the backbone's HF id):
{presets}
  The four GRACE backbone presets change memory settings (and --eval-every) only: GRACE's updates, token for token
  (bench/memory_model.py; README "Memory model").
"""


def _as_flag(name: str, value) -> str:
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {value}"


def _parser(defaults: dict, sources: dict, add_help: bool = True) -> argparse.ArgumentParser:
    """Flags generated from the fields. Nothing has an argparse default (SUPPRESS), so the parsed
    namespace holds exactly the flags that were typed; `defaults` only fill in the help text."""
    p = argparse.ArgumentParser(
        prog="train.py", add_help=add_help, argument_default=argparse.SUPPRESS,
        usage="%(prog)s [--model NAME] [--recipe {minigrace,grace}] [--data PATH] [--config FILE] [--resume RUN] "
              "[options]   (--help lists every option)",
        description="Train an instruct LLM as a text encoder with GRACE (contrastive policy optimization). "
                    "With no arguments: the built-in tiny model on the built-in data, on CPU, in a few minutes.",
        epilog=_help_epilog() if add_help else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(GraceConfig):
        help_ = (f.metadata["help"] + _default_note(f.name, defaults[f.name], sources.get(f.name, "default")))
        help_ = help_.replace("%", "%%")
        if f.type == "bool":
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag(f.name), type={"int": int, "float": float, "str": str}[f.type], help=help_,
                           choices=f.metadata.get("choices"),
                           metavar=f.name.upper() if "choices" not in f.metadata else None)
    p.add_argument("--resume", help="continue a run: a run directory, or 'latest' (newest under runs/)")
    return p


def _default_note(name: str, value, source: str) -> str:
    where = "" if source == "default" else f", from {source}"
    grace = GRACE_RECIPE.get(name, FIELDS[name].default) if name in GRACE_RECIPE else None
    grace_note = f"; GRACE: {grace}" if name in GRACE_RECIPE and grace != value else ""
    return f" (default: {'none' if value == '' else value}{where}{grace_note})"


# ---------------------------------------------------------------------------------------------
# Config files


def _load_file(path: str) -> dict:
    """A YAML or JSON file of fields → {field: value}, each checked against the field's type."""
    values = _read_file(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {unknown}: the fields are the flags of "
                         f"`python train.py --help`, with _ for -")
    if "config" in values:
        raise ValueError(f"{path}: a config file cannot name another config file")
    return {name: _coerce(path, name, value) for name, value in values.items()}


def _read_file(path: str):
    """The parsed YAML (.yaml/.yml) or JSON of a --config file; a one-line ValueError for a file that is not one."""
    if os.path.isdir(path) or not os.path.exists(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{path} {what}: pass a YAML or JSON file")
    import yaml
    try:
        with open(path) as fh:
            return (yaml.safe_load(fh) or {}) if path.endswith((".yaml", ".yml")) else json.load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}): fix the file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}): fix the file "
                         f"(a .yaml/.yml name reads it as YAML)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: pass a YAML or JSON file") from None


def _coerce(path: str, name: str, value):
    typ = FIELDS[name].type
    if typ == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not _has_type(value, typ):
        raise ValueError(f"{path}: {name}: expected {_TYPE_WORDS[typ]}, got {value!r}")
    choices = FIELDS[name].metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{path}: {name}: must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if typ == "float" else value


# ---------------------------------------------------------------------------------------------
# Resuming

# What a resumed run may change: how long it runs, what it logs and evaluates, not what it trains.
# How it runs (processes, sharding, offload, rollout engine) may change too: checkpoints hold full state.
RESUMABLE = ("max_steps", "epochs", "log_every", "report_to", "eval_every", "eval_tasks", "eval_size", "save_every",
             "keep_last", "max_bad_steps", "device", "parallel", "offload", "rollout", "rollout_rows", "vllm_gpu_memory")
# Fields added after runs were saved without them: such a run trained without them, and resumes so.
ADDED_SINCE = {"recipe": "minigrace", "dual_clip": 0.0, "kl_clamp": 0.0}


def resume_conflicts(saved: dict, requested: dict) -> list[str]:
    """'--flag saved → requested' for each field that differs and may not change when resuming."""
    return [f"{flag(k)} {saved[k]!r} → {v!r}" for k, v in requested.items()
            if k in saved and k not in RESUMABLE + ("out", "config", "overwrite") and saved[k] != v]


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
    """The run's own config, with the given fields that may change on resume (RESUMABLE)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as fh:
            saved = {**ADDED_SINCE, **json.load(fh)}
    except ValueError as e:
        raise ValueError(f"--resume {run_dir}: its config.json is not valid JSON ({e}): restore it from a "
                         f"checkpoint's trainer state or a backup, or start a new run") from None
    conflicts = resume_conflicts(saved, overrides)
    if conflicts:
        raise ValueError(f"--resume {run_dir}: the run was trained with a different config: {', '.join(conflicts)}. "
                         f"Only {', '.join(RESUMABLE)} may change when resuming; start a new run for the rest")
    return GraceConfig(**{k: v for k, v in {**saved, **overrides, "out": run_dir}.items() if k in FIELDS}).validate()


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[GraceConfig, str]:
    """CLI → (config, resume run dir or ""). Precedence: command line > --config file > --recipe >
    model preset > defaults; with --resume, the run's saved config plus the flags that may change.

    A flag counts as given when it is typed, whatever its value (`--lr 1e-6` beats a preset's lr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    base = {name: f.default for name, f in FIELDS.items()}
    # Pass 1, without --help: the typed --model / --recipe / --config pick the defaults --help shows.
    typed = vars(_parser(base, {}, add_help=False).parse_known_args(argv)[0])
    file_path = typed.get("config", "")
    try:
        file_values = _load_file(file_path) if file_path else {}
    except (OSError, ValueError) as e:
        _parser(base, {}).error(f"--config: {e}")
    model = typed.get("model", file_values.get("model", base["model"]))
    recipe = typed.get("recipe", file_values.get("recipe", base["recipe"]))
    defaults, sources = {}, {}
    for where, values in _default_layers(model, recipe, file_path, file_values):
        defaults.update(values)
        sources.update(dict.fromkeys(values, where))
    # Pass 2: help with those defaults, unknown flags, bad values.
    parser = _parser(defaults, sources)
    typed = vars(parser.parse_args(argv))
    resume = typed.pop("resume", "")
    try:
        if resume:
            if "out" in typed:
                raise ValueError("--out with --resume: a resumed run continues in its own directory")
            if typed.get("overwrite"):
                raise ValueError("--overwrite with --resume: --resume continues the run, --overwrite starts it over")
            run_dir = find_run(resume)
            return resume_config(run_dir, {**file_values, **typed}), run_dir
        return GraceConfig(**{**defaults, **typed}).validate(), ""
    except ConfigError as e:
        if e.field in typed:
            parser.error(str(e))
        origin = "the resumed run's config" if resume else sources.get(e.field)
        parser.error(f"{e} ({flag(e.field)} {e.value!r} comes from {origin})")
    except (OSError, ValueError) as e:
        parser.error(str(e))
