"""Train: the GRACE loop. One step, top to bottom:

    prompts   each main text ×G, its query and hard negative once            prompts.py
    rollout   sample rationales (main: temperature 1.0, query/negative: 0.5)  rollout.py
    embed     one no-grad forward → embeddings + old log-probs             embed.py
    reward    contrastive reward of each main rollout from embeddings      reward.py
    advantage reward − group mean                                          advantage.py
    update    clipped policy gradient on the main rollouts, AdamW          loss.py

Only the main rationales (the positive document's, or the text's in unsupervised mode) are
trained; query and negative rationales come from the same policy but get no gradient.

Under torchrun every rank runs this loop on its share of each step's prompts; parallel.py does the
rest (shards, the all-gather the reward needs, DDP / FSDP2, full-state checkpoints).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import lora, parallel
from .advantage import compute_advantages
from .checkpoint import (latest_checkpoint, load_trainer_state, prune_checkpoints, rng_state, save_checkpoint,
                         set_rng_state, write_json)
from .config import GraceConfig, resume_conflicts
from .data import Example, PromptBatches, load_examples, split_heldout
from .embed import forward_rollouts, microbatches, trim
from .eval import heldout_retrieval
from .loss import policy_forward, policy_loss, response_logprobs
from .models import eos_token_ids, load_model, model_source, resolve_dtype
from .prompts import chat_prompt
from .reward import compute_rewards, cross_text_cosine, nonfinite_rewards
from .rollout import Rollouts, cat_rollouts, generate


# ---------------------------------------------------------------------------------------------
# Data


def load_data(cfg: GraceConfig, out_dir: str, write_rejects: bool = True
              ) -> tuple[list[Example], list[Example], str, object]:
    """(train examples, held-out supervised examples, mode, builtin corpus or None)."""
    corpus = None
    rejects = os.path.join(out_dir, "rejected_rows.jsonl") if cfg.skip_bad_rows and write_rejects else None
    if cfg.data == "builtin":
        from .builtin import builtin_corpus
        corpus = builtin_corpus(seed=0)
        mode = "supervised" if cfg.mode == "auto" else cfg.mode
        train, _ = load_examples(corpus.train, mode)
        heldout, _ = load_examples(corpus.heldout, "supervised")
    elif cfg.data == "everyday":  # the shipped real-language set: train split, held-out split for eval
        from .everyday import HELDOUT_PATH, TRAIN_PATH
        train, mode = load_examples(TRAIN_PATH, cfg.mode)
        heldout, _ = load_examples(cfg.eval_data or HELDOUT_PATH, "supervised")
    else:
        train, mode = load_examples(cfg.data, cfg.mode, skip_bad_rows=cfg.skip_bad_rows, rejects_path=rejects)
        if cfg.eval_data:
            heldout, _ = load_examples(cfg.eval_data, "supervised")
        elif mode == "supervised" and cfg.eval_fraction > 0:
            train, heldout = split_heldout(train, cfg.eval_fraction, cfg.seed, max_heldout=cfg.eval_size)
        else:
            heldout = []  # unsupervised data has no queries: pass --eval-data to measure retrieval
    return train, heldout[:cfg.eval_size], mode, corpus


# ---------------------------------------------------------------------------------------------
# One GRACE step


@dataclass
class Policy:
    model: torch.nn.Module  # what trains: the HF (or peft) model, wrapped in DDP / sharded by FSDP under torchrun
    module: torch.nn.Module  # the HF (or peft) model itself: generation, no-grad forwards, saving
    tokenizer: object
    ref_model: torch.nn.Module | None  # frozen copy, only when kl_coef > 0 without LoRA
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast on CUDA; None on CPU
    ranks: parallel.Ranks
    lora: bool = False  # adapters on a frozen base: the base (adapters off) is the KL reference
    vllm: object | None = None  # VLLMRollout for --rollout vllm

    @classmethod
    def single_process(cls, model, tokenizer) -> "Policy":
        """One process, no autocast, no KL reference: to drive grace_step / evaluate from a script."""
        return cls(model, model, tokenizer, None, None, parallel.Ranks(0, 1, model.device, launched=False))


def autocast(policy: Policy):
    if policy.autocast_dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=policy.autocast_dtype)


def uses_negatives(examples: list[Example], mode: str) -> bool:
    """Hard negatives are used only when every example of the (global) batch has one (else in-batch only)."""
    return mode == "supervised" and all(ex.negative for ex in examples)


def build_rollout_prompts(tokenizer, examples: list[Example], cfg: GraceConfig, mode: str, use_negatives: bool):
    """Main prompts ×G, then one query prompt per example, then one negative prompt per example.

    Unsupervised: the "query" is the text itself, sampled once at the lower temperature, so the
    positive pair is (a temperature-0.5 rationale, each temperature-1.0 rationale) of the same text.
    """
    main = [chat_prompt(tokenizer, ex.text, cfg.max_prompt_len) for ex in examples]
    query_texts = [ex.query for ex in examples] if mode == "supervised" else [ex.text for ex in examples]
    queries = [chat_prompt(tokenizer, q, cfg.max_prompt_len) for q in query_texts]
    negatives = [chat_prompt(tokenizer, ex.negative, cfg.max_prompt_len) for ex in examples] if use_negatives else []
    prompts = [p for p in main for _ in range(cfg.group_size)] + queries + negatives
    temperatures = torch.tensor([cfg.temperature] * (len(main) * cfg.group_size)
                                + [cfg.aux_temperature] * (len(queries) + len(negatives)))
    return prompts, temperatures


def rollout_noise(generator: torch.Generator, n_prompts: int, cfg: GraceConfig, use_negatives: bool,
                  ranks: parallel.Ranks) -> torch.Tensor:
    """Sampling noise of this rank's rollout rows [n_rows, max_new_tokens], in build_rollout_prompts' order.

    Every prompt of the global batch owns G + 1 (+1) rows of noise (its main rollouts, query, negative),
    drawn on every rank from the same generator: a rollout is the same whichever rank samples it."""
    sides = cfg.group_size + 1 + int(use_negatives)
    noise = torch.rand(n_prompts, sides, cfg.max_new_tokens, generator=generator, device=generator.device)
    mine = noise[ranks.rank::ranks.world]  # [P/N, sides, R]: this rank's prompts (parallel.shard)
    main, aux = mine[:, :cfg.group_size].reshape(-1, cfg.max_new_tokens), mine[:, cfg.group_size:]
    return torch.cat([main, *aux.unbind(1)])  # [P/N·G + P/N (+ P/N), R]


def sample_rollouts(policy: Policy, prompts, temperatures, noise, cfg: GraceConfig) -> Rollouts:
    """Rationales for `prompts` from the current policy: vLLM when enabled, else transformers."""
    module, tokenizer = policy.module, policy.tokenizer
    kw = dict(max_new_tokens=cfg.max_new_tokens, eos_ids=eos_token_ids(module, tokenizer),
              pad_id=tokenizer.pad_token_id, top_p=cfg.top_p)
    if policy.vllm is not None:
        return policy.vllm.generate(prompts, temperatures, noise, device=policy.ranks.device, **kw)
    # At most rollout_rows rows per generation (the KV cache grows with rows × tokens). Each row has
    # its own noise, so the rationales are the same however the rows are split.
    step = cfg.rollout_rows or len(prompts)
    parts = [generate(module, prompts[i:i + step], temperatures[i:i + step], noise=noise[i:i + step], **kw)
             for i in range(0, len(prompts), step)]
    return parts[0] if len(parts) == 1 else cat_rollouts(parts, tokenizer.pad_token_id)


def reference_logprobs(policy: Policy, rows: Rollouts, cfg: GraceConfig) -> torch.Tensor | None:
    """Log-probs under the frozen reference [n, L]: the base with LoRA adapters off, or the frozen copy."""
    if cfg.kl_coef <= 0:
        return None
    if policy.lora:
        with policy.module.disable_adapter():
            return forward_rollouts(policy.module, rows, cfg.max_tokens_per_microbatch, cfg.logprob_chunk).old_logprobs
    return forward_rollouts(policy.ref_model, rows, cfg.max_tokens_per_microbatch, cfg.logprob_chunk).old_logprobs


def grace_step(policy: Policy, optimizer, scheduler, examples: list[Example], cfg: GraceConfig, mode: str,
               generator: torch.Generator, reward_fn=compute_rewards) -> tuple[dict, dict | None]:
    """Rollout → embed → reward → advantage → update. Returns (metrics, data for samples.jsonl).

    A step whose rewards are not finite makes no update: metrics["skipped"] says why
    (and the sample is None). An update whose loss or gradients are not finite is dropped the same way.

    `examples` is the global batch; under torchrun this rank rolls out and trains on its share
    (parallel.shard), and the reward sees every rank's embeddings."""
    model, module, tokenizer, ranks = policy.model, policy.module, policy.tokenizer, policy.ranks
    t0 = time.perf_counter()
    group = cfg.group_size
    use_negatives = uses_negatives(examples, mode)
    local = parallel.shard(examples, ranks)
    n_prompts, n_main = len(local), len(local) * group

    # 1-2. Sample rationales for this rank's prompts (batched generation, per-row noise).
    prompts, temperatures = build_rollout_prompts(tokenizer, local, cfg, mode, use_negatives)
    noise = rollout_noise(generator, len(examples), cfg, use_negatives, ranks)
    if policy.vllm is not None:
        sync_vllm_weights(policy)
    module.eval()
    with autocast(policy), parallel.full_weights(model):
        rollouts = sample_rollouts(policy, prompts, temperatures, noise, cfg)
        # 3. One forward: embeddings for the reward, log-probs of the sampling policy for the ratio.
        fwd = forward_rollouts(module, rollouts, cfg.max_tokens_per_microbatch, cfg.logprob_chunk)
        main = rollouts.rows(slice(0, n_main))
        ref_logprobs = reference_logprobs(policy, main, cfg)
    t_rollout = time.perf_counter() - t0

    # 4-5. Reward each main rollout against the whole (global) batch; advantages relative to its group.
    doc_emb = parallel.gather_prompts(fwd.embeddings[:n_main], group, ranks)  # [P*G, H]
    query_emb = parallel.gather_prompts(fwd.embeddings[n_main:n_main + n_prompts], 1, ranks)  # [P, H]
    neg_emb = parallel.gather_prompts(fwd.embeddings[n_main + n_prompts:], 1, ranks) if use_negatives else None
    truncated = parallel.gather_prompts(main.truncated.long(), group, ranks).bool()  # [P*G]
    rewards = reward_fn(doc_emb, query_emb, neg_emb, truncated, cfg, mode)
    problem = nonfinite_rewards(rewards)  # the global rewards: every rank skips the same steps
    if problem:  # no update from this batch (never a silent 0 reward)
        scheduler.step()  # the step still counts: the learning-rate schedule follows the step number
        return {"skipped": problem, "step_time_s": time.perf_counter() - t0}, None
    all_advantages, frac_zero_std = compute_advantages(rewards.total, group, cfg.scale_std)  # [P*G], finite
    advantages = parallel.local_rows(all_advantages, group, ranks)  # [P/N*G]: this rank's rollouts

    # 6. Policy update on the main rollouts: mini-batches of prompts, micro-batches by token budget.
    old_logprobs = fwd.old_logprobs[:n_main]
    model.train()
    rows_per_update = cfg.mini_batch_size // ranks.world * group
    stats = {"loss": 0.0, "clip_frac_sum": 0.0, "kl_sum": 0.0, "grad_norm": 0.0, "skipped_updates": 0}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        for start in range(0, n_main, rows_per_update):
            update_rows = torch.arange(start, start + rows_per_update, device=main.ids.device)
            # Token-mean over the whole mini-batch (every rank's share). DDP / FSDP average gradients
            # over the N ranks, so each rank divides by tokens/N: the average is the 1-process gradient.
            token_count = parallel.sum_over_ranks([int(main.response_mask[update_rows].sum())], ranks)[0]
            normalizer = max(token_count, 1) / ranks.world
            micros = microbatches(main.attention[update_rows].sum(-1), cfg.max_tokens_per_microbatch)
            # Every rank runs the same number of forward/backward passes (each may communicate): a
            # rank with fewer pads with passes over one row whose loss is multiplied by 0.
            n_real, n_micro = len(micros), parallel.max_over_ranks(len(micros), ranks)
            micros += [micros[0][:1]] * (n_micro - n_real)
            for i, micro in enumerate(micros):
                rows = update_rows[micro.to(update_rows.device)]
                part, cols = trim(main.rows(rows))
                with parallel.gradient_sync(model, sync=i == n_micro - 1), autocast(policy):
                    hidden = policy_forward(model, part.ids, part.attention)
                    lm_head = module.get_output_embeddings().weight  # after the forward: gathered under FSDP
                    logprobs = response_logprobs(hidden, lm_head, part.ids, part.response_mask, cfg.logprob_chunk)
                    loss, s = policy_loss(logprobs, old_logprobs[rows][:, cols], advantages[rows], part.response_mask,
                                          cfg.clip_eps, normalizer,
                                          ref_logprobs[rows][:, cols] if ref_logprobs is not None else None,
                                          cfg.kl_coef)
                    if i >= n_real:
                        loss = loss * 0.0
                    loss.backward()
                if i < n_real:
                    stats["loss"] += loss.item() / ranks.world
                    stats["clip_frac_sum"] += s["clip_frac_sum"]
                    stats["kl_sum"] += s.get("kl_sum", 0.0)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            if torch.isfinite(grad_norm):  # (a non-finite loss gives a non-finite norm too)
                optimizer.step()
                stats["grad_norm"] += float(grad_norm)
            else:  # a non-finite gradient would poison the weights: drop this update, count it
                stats["skipped_updates"] += 1
            optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    scheduler.step()

    # Metrics of the global batch: sums over ranks (one process: unchanged).
    lengths = parallel.gather_prompts(main.response_lengths, group, ranks).float()  # [P*G]
    loss_sum, clip_sum, kl_sum, response_tokens, prompt_cut = parallel.sum_over_ranks(
        [stats["loss"], stats["clip_frac_sum"], stats["kl_sum"], float(rollouts.response_mask.sum()),
         float(rollouts.prompt_truncated.float().mean())], ranks)
    step_time = time.perf_counter() - t0
    n_tokens = max(int(lengths.sum()), 1) * cfg.ppo_epochs
    metrics = {
        "reward_mean": float(rewards.total.mean()),
        "reward_std": float(rewards.total.std()),
        **{f"reward_{name}": float(v.mean()) for name, v in rewards.parts.items()},
        "advantage_abs_mean": float(all_advantages.abs().mean()),
        "frac_zero_std_groups": frac_zero_std,
        "clip_frac": clip_sum / n_tokens,
        "kl": kl_sum / n_tokens,
        "loss": loss_sum / n_updates,
        "grad_norm": stats["grad_norm"] / n_updates,
        "skipped_updates": stats["skipped_updates"],
        "response_len_mean": float(lengths.mean()),
        "truncated_frac": float(truncated.float().mean()),
        "prompt_truncated_frac": prompt_cut / ranks.world,
        "emb_cross_cos_mean": cross_text_cosine(doc_emb, group),
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": response_tokens / step_time,
        "rollout_time_s": t_rollout,
        "step_time_s": step_time,
    }
    if stats["skipped_updates"]:
        metrics["skipped"] = f"{stats['skipped_updates']} of {n_updates} updates had a non-finite loss or gradient"
    sample = {"examples": local, "rationales": tokenizer.batch_decode(main.responses(), skip_special_tokens=True),
              "rewards": parallel.local_rows(rewards.total, group, ranks).tolist()}
    return metrics, sample


def sync_vllm_weights(policy: Policy) -> None:
    """Copy the trainer's current weights into the vLLM engine (full tensors; LoRA merged for the copy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .vllm_rollout import hf_named_weights
    if policy.lora:
        policy.module.merge_adapter()
    try:
        weights = get_model_state_dict(policy.module, options=StateDictOptions(full_state_dict=True))
        policy.vllm.sync_weights(hf_named_weights(policy.module, weights))
    finally:
        if policy.lora:
            policy.module.unmerge_adapter()


# ---------------------------------------------------------------------------------------------
# Evaluation and logging


def evaluate(policy: Policy, heldout: list[Example], cfg: GraceConfig, corpus, tasks=()) -> tuple[dict, list[dict]]:
    """Held-out retrieval with greedy rationales, and the mteb `tasks` (--eval-tasks) through the
    Encoder → ({eval_*: value}, a few example rationales).

    Every rank evaluates (the same numbers): under FSDP the forwards need all ranks' weights."""
    out, examples = {}, []
    if heldout:
        with autocast(policy), parallel.full_weights(policy.model):
            metrics, doc_rationales, _ = heldout_retrieval(
                policy.module, policy.tokenizer, heldout, max_new_tokens=cfg.max_new_tokens,
                max_prompt_len=cfg.max_prompt_len)
        out = {f"eval_{k}": v for k, v in metrics.items()}
        if corpus is not None:  # built-in data knows each text's topic: how often does the rationale name it?
            from .builtin import rationale_topic
            rows = corpus.heldout[:len(heldout)]
            named = [rationale_topic(r, corpus) == row["topic"] for r, row in zip(doc_rationales, rows)]
            out["eval_rationale_topic_acc"] = sum(named) / len(named)
        examples = [{"text": ex.text, "rationale": r} for ex, r in zip(heldout[:3], doc_rationales[:3])]
    if tasks:
        from .encode import Encoder
        from .eval import MtebEncoder, run_tasks

        encoder = Encoder((policy.module, policy.tokenizer), max_new_tokens=cfg.max_new_tokens,
                          max_prompt_len=cfg.max_prompt_len, max_tokens_per_microbatch=cfg.max_tokens_per_microbatch)
        with autocast(policy), parallel.full_weights(policy.model):
            scores, failed = run_tasks(MtebEncoder(encoder, name=cfg.model), tasks, None, progress=False)
        for why in failed.values():
            if policy.ranks.is_main:
                print(f"warning: {why}")
        out.update({f"eval_mteb_{task}": score for task, score in scores.items()})
    return out, examples


class RunLog:
    """metrics.jsonl (one JSON object per row) and samples.jsonl, flushed every write."""

    def __init__(self, out_dir: str):
        self.metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self.samples = open(os.path.join(out_dir, "samples.jsonl"), "a")

    def metric(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def sample(self, step: int, sample: dict, group_size: int, n: int = 2) -> None:
        for p, ex in enumerate(sample["examples"][:n]):
            for g in range(min(2, group_size)):
                i = p * group_size + g
                self.samples.write(json.dumps({"step": step, "input": ex.text, "rationale": sample["rationales"][i],
                                               "reward": sample["rewards"][i]}) + "\n")
        self.samples.flush()

    def close(self):
        self.metrics.close()
        self.samples.close()


# ---------------------------------------------------------------------------------------------
# The run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); a checkpoint was saved."""


def main(cfg: GraceConfig, resume: str = "", reward_fn=compute_rewards) -> dict:
    """Run GRACE training with `cfg`; returns the summary (also written to <out>/summary.json).

    resume: a run directory whose newest checkpoint to continue from (`cfg` is that run's config, as
    `config.parse_args` builds it for --resume). reward_fn: compute_rewards or a function with its
    signature. Under torchrun every rank calls this; rank 0 logs and saves (parallel.py).
    """
    ranks = parallel.setup(cfg.device)
    try:
        return _train(cfg, resume, reward_fn, ranks)
    finally:
        parallel.teardown(ranks)


def build_policy(cfg: GraceConfig, ranks: parallel.Ranks, resume_from: str | None) -> Policy:
    """Load the model (+ LoRA adapters), gradient checkpointing, the KL reference, DDP / FSDP."""
    device = ranks.device
    model_dtype = resolve_dtype(cfg.dtype, device)
    compute_dtype = model_dtype if device.type == "cuda" and model_dtype != torch.float32 else None
    # Train fp32 weights (AdamW state stays exact) and compute in bf16/fp16 under autocast on GPU.
    if cfg.lora_r:
        base, tokenizer = load_model(cfg.model, str(device), "fp32")
        module = lora.add_adapters(base, cfg, resume_from)
    else:
        module, tokenizer = load_model(resume_from or cfg.model, str(device), "fp32")
    if cfg.grad_checkpointing:  # non-reentrant: works with a frozen base (LoRA) too
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if cfg.kl_coef > 0 and not cfg.lora_r:
        ref_model = copy.deepcopy(module).eval().requires_grad_(False)
    vllm = None
    if cfg.rollout == "vllm":
        from .vllm_rollout import make_vllm_rollout
        vllm = make_vllm_rollout(cfg, model_source(cfg.model), device, ranks.distributed, bool(cfg.lora_r))
    model = parallel.wrap(module, ranks, cfg.parallel, compute_dtype, cfg.offload)
    return Policy(model, parallel.unwrap(model), tokenizer, ref_model, compute_dtype, ranks, bool(cfg.lora_r), vllm)


def _train(cfg: GraceConfig, resume: str, reward_fn, ranks: parallel.Ranks) -> dict:
    from tqdm.auto import tqdm

    if resume:
        out_dir, resume_from = resume, latest_checkpoint(resume)
        if resume_from is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint-NNNNNN directory in it")
        state = load_trainer_state(resume_from)
        conflicts = resume_conflicts(state["config"], cfg.to_dict())
        if conflicts:
            raise ValueError(f"--resume {resume}: the checkpoint was trained with a different config: "
                             f"{', '.join(conflicts)}")
    else:
        out_dir = parallel.broadcast(cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), ranks)
        resume_from = None
    if cfg.batch_size % ranks.world or cfg.mini_batch_size % ranks.world:
        raise ValueError(f"--batch-size ({cfg.batch_size}) and --mini-batch-size ({cfg.mini_batch_size}) must be "
                         f"multiples of the number of processes ({ranks.world}): each rank takes an equal share")
    main_rank = ranks.is_main
    if main_rank:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"--out {out_dir}: not writable")
    seed_everything(cfg.seed)

    train_examples, heldout, mode, corpus = load_data(cfg, out_dir, write_rejects=main_rank)
    batches = PromptBatches(train_examples, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    if main_rank:
        write_json(os.path.join(out_dir, "config.json"), {**cfg.to_dict(), "resolved_mode": mode})
    tasks = []
    if cfg.eval_tasks:
        from .eval import load_tasks
        tasks, not_run = load_tasks([t.strip() for t in cfg.eval_tasks.split(",") if t.strip()])
        for why in not_run.values():
            if main_rank:
                print(f"warning: --eval-tasks: {why}")

    policy = build_policy(cfg, ranks, resume_from)
    model, module, tokenizer, device = policy.model, policy.module, policy.tokenizer, ranks.device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    start_step, skipped_steps = 0, 0
    if resume_from:
        parallel.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])
        generator.set_state(state["generator"])
        start_step, skipped_steps = state["step"], state.get("skipped_steps", 0)
        if main_rank:
            print(f"resuming {out_dir} from step {start_step} ({resume_from})")

    # Ctrl-C / SIGTERM: finish the current step, save, exit cleanly. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if main_rank:
            tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, saving, then stopping "
                       f"(press Ctrl-C again to abort now)")

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log = RunLog(out_dir) if main_rank else None
    n_trainable, n_params = lora.trainable_fraction(module)
    if main_rank:
        lora_note = f", LoRA r={cfg.lora_r}: {n_trainable / 1e6:.3f}M trainable" if cfg.lora_r else ""
        scale_note = f" · {ranks.world} processes ({cfg.parallel}{', offload' if cfg.offload else ''})" \
            if ranks.distributed else ""
        print(f"GRACE {mode} · model {cfg.model} ({n_params / 1e6:.2f}M params{lora_note}) · {len(train_examples)} "
              f"train / {len(heldout)} held-out examples · {total_steps} steps × {cfg.batch_size} prompts × "
              f"G={cfg.group_size} · reward {cfg.reward} · {device}{scale_note} → {out_dir}")

    before = {}
    if start_step == 0:
        before, examples_before = evaluate(policy, heldout, cfg, corpus, tasks)
        if main_rank:
            log.metric({"step": 0, **before})
    else:
        before = state.get("eval_before", {})

    def checkpoint(name: str, step: int, final: bool = False) -> str:
        """Every rank gathers the full state (a collective under FSDP); rank 0 writes it."""
        weights, optimizer_state = parallel.full_state_dicts(model, optimizer)
        path = os.path.join(out_dir, name)
        if main_rank:  # everything needed to continue exactly, on any number of processes
            state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                     "batches": batches.state_dict(), "rng": rng_state(), "generator": generator.get_state(),
                     "step": step, "skipped_steps": skipped_steps, "config": cfg.to_dict(), "eval_before": before}
            save_checkpoint(path, module, tokenizer, state, state_dict=weights, merge_adapter=final and policy.lora)
        return path

    def save(step: int) -> str:
        path = checkpoint(f"checkpoint-{step:06d}", step)
        if main_rank:
            prune_checkpoints(out_dir, cfg.keep_last)  # verifies the new checkpoint before deleting older ones
        return path

    reward_means, step, bad_in_a_row, loop_started = [], start_step, 0, time.perf_counter()
    try:
        bar = tqdm(range(start_step, total_steps), desc="GRACE", initial=start_step, total=total_steps,
                   disable=not main_rank)
        for step in bar:
            metrics, sample = grace_step(policy, optimizer, scheduler, next(batches), cfg, mode, generator, reward_fn)
            if "skipped" in metrics:  # non-finite rewards, loss or gradients: no (or a partial) update
                skipped_steps, bad_in_a_row = skipped_steps + 1, bad_in_a_row + 1
                if main_rank:
                    tqdm.write(f"step {step + 1}: skipped: {metrics['skipped']}")
            else:
                bad_in_a_row = 0
            row = {"step": step + 1, "epoch": batches.epoch, **metrics, "skipped_steps": skipped_steps}
            if bad_in_a_row >= cfg.max_bad_steps:
                path = save(step + 1)
                if main_rank:
                    log.metric(row)
                    log.close()
                raise TrainingStopped(
                    f"{bad_in_a_row} consecutive steps had non-finite values (last: {metrics['skipped']}); their "
                    f"updates were skipped, so {path} holds the last good weights. Likely causes: a learning rate "
                    f"too high (--lr {cfg.lr}), fp16 overflow (--dtype), or a reward function that returns NaN")
            if sample is None:  # a skipped step: its row says why; checkpoints and Ctrl-C still apply below
                if main_rank:
                    log.metric(row)
            else:
                reward_means.append(metrics["reward_mean"])
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
                    row.update(evaluate(policy, heldout, cfg, corpus, tasks)[0])
                if main_rank:
                    if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                        log.metric(row)
                    if (step + 1) % (10 * cfg.log_every) == 0 or step == start_step:
                        log.sample(step + 1, sample, cfg.group_size)
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", pos=f"{metrics['reward_positive']:.3f}",
                                    cross=f"{metrics['emb_cross_cos_mean']:.3f}",
                                    len=f"{metrics['response_len_mean']:.1f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                save(step + 1)
            if parallel.max_over_ranks(int(stop["requested"]), ranks):  # all ranks stop at the same step
                stop["requested"] = True
                break
        bar.close()
        done = step + 1
        train_seconds = time.perf_counter() - loop_started
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)

    if stop["requested"] and done < total_steps:
        path = save(done)
        if main_rank:
            print(f"stopped at step {done}/{total_steps}; saved {path}. Continue with: python train.py --resume {out_dir}")
            log.close()
        return {"stopped_at": done, "checkpoint": path}

    after, examples_after = evaluate(policy, heldout, cfg, corpus, tasks)
    final = checkpoint("checkpoint-final", done, final=True)
    summary = {"steps": done, "mode": mode, "skipped_steps": skipped_steps, "reward_first10": _mean(reward_means[:10]),
               "reward_last10": _mean(reward_means[-10:]), "train_seconds": round(train_seconds, 1),
               "threads": torch.get_num_threads(), "eval_before": before, "eval_after": after,
               "checkpoint": final}
    if main_rank:
        log.metric({"step": done, **after})
        log.close()
        write_json(os.path.join(out_dir, "summary.json"), summary)
        _print_summary(summary, examples_after)
    return summary


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _print_summary(summary: dict, examples: list[dict]) -> None:
    print(f"\nGRACE {summary['mode']}: {summary['steps']} steps")
    print(f"  {'mean reward':<28}{summary['reward_first10']:>10.3f} → {summary['reward_last10']:.3f}"
          f"   (first 10 steps → last 10)")
    before, after = summary["eval_before"], summary["eval_after"]
    for key in after:
        print(f"  {'held-out ' + key[5:]:<28}{before.get(key, float('nan')):>10.3f} → {after[key]:.3f}")
    for ex in examples[:2]:
        print(f"  e.g. {ex['text'][:70]!r}\n       → {ex['rationale'][:90]!r}")
    print(f"  checkpoint: {summary['checkpoint']}")

