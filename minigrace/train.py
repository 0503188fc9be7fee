"""Train: the GRACE loop. One step, top to bottom:

    prompts   each main text ×G, its query and hard negative once            prompts.py
    rollout   sample rationales (main: temperature 1.0, query/negative: 0.5)  rollout.py
    embed     one no-grad forward → embeddings + old log-probs             embed.py
    reward    contrastive reward of each main rollout from embeddings      reward.py
    advantage reward − group mean                                          advantage.py
    update    clipped policy gradient on the main rollouts, AdamW          loss.py

Only the main rationales (the positive document's, or the text's in unsupervised mode) are
trained; query and negative rationales come from the same policy but get no gradient.
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

from .advantage import compute_advantages
from .checkpoint import (latest_checkpoint, load_trainer_state, prune_checkpoints, rng_state, save_checkpoint,
                         set_rng_state, write_json)
from .config import GraceConfig
from .data import Example, PromptBatches, load_examples, split_heldout
from .embed import forward_rollouts, microbatches, trim
from .eval import heldout_retrieval
from .loss import policy_forward, policy_loss, response_logprobs
from .models import eos_token_ids, load_model, resolve_device, resolve_dtype
from .prompts import chat_prompt
from .reward import compute_rewards, cross_text_cosine
from .rollout import generate


# ---------------------------------------------------------------------------------------------
# Data


def load_data(cfg: GraceConfig, out_dir: str) -> tuple[list[Example], list[Example], str, object]:
    """(train examples, held-out supervised examples, mode, builtin corpus or None)."""
    corpus = None
    rejects = os.path.join(out_dir, "rejected_rows.jsonl") if cfg.skip_bad_rows else None
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
    model: torch.nn.Module
    tokenizer: object
    ref_model: torch.nn.Module | None  # frozen copy, only when kl_coef > 0
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast on CUDA; None on CPU


def autocast(policy: Policy):
    if policy.autocast_dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=policy.autocast_dtype)


def build_rollout_prompts(tokenizer, examples: list[Example], cfg: GraceConfig, mode: str):
    """Main prompts ×G, then one query prompt per example, then one negative prompt per example.

    Unsupervised: the "query" is the text itself, sampled once at the lower temperature, so the
    positive pair is (a temperature-0.5 rationale, each temperature-1.0 rationale) of the same text.
    Hard negatives are used only when every example of the batch has one (else in-batch only).
    """
    main = [chat_prompt(tokenizer, ex.text, cfg.max_prompt_len) for ex in examples]
    query_texts = [ex.query for ex in examples] if mode == "supervised" else [ex.text for ex in examples]
    queries = [chat_prompt(tokenizer, q, cfg.max_prompt_len) for q in query_texts]
    use_negatives = mode == "supervised" and all(ex.negative for ex in examples)
    negatives = [chat_prompt(tokenizer, ex.negative, cfg.max_prompt_len) for ex in examples] if use_negatives else []
    prompts = [p for p in main for _ in range(cfg.group_size)] + queries + negatives
    temperatures = torch.tensor([cfg.temperature] * (len(main) * cfg.group_size)
                                + [cfg.aux_temperature] * (len(queries) + len(negatives)))
    return prompts, temperatures, use_negatives


def grace_step(policy: Policy, optimizer, scheduler, examples: list[Example], cfg: GraceConfig, mode: str,
               generator: torch.Generator) -> tuple[dict, dict]:
    """Rollout → embed → reward → advantage → update. Returns (metrics, data for samples.jsonl)."""
    model, tokenizer = policy.model, policy.tokenizer
    t0 = time.perf_counter()
    n_prompts, group = len(examples), cfg.group_size
    n_main = n_prompts * group

    # 1-2. Sample rationales for every prompt of the step in one batched generation.
    prompts, temperatures, use_negatives = build_rollout_prompts(tokenizer, examples, cfg, mode)
    model.eval()
    with autocast(policy):
        rollouts = generate(model, prompts, temperatures, max_new_tokens=cfg.max_new_tokens,
                            eos_ids=eos_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
                            top_p=cfg.top_p, generator=generator)
        # 3. One forward: embeddings for the reward, log-probs of the sampling policy for the ratio.
        fwd = forward_rollouts(model, rollouts, cfg.max_tokens_per_microbatch, cfg.logprob_chunk)
    t_rollout = time.perf_counter() - t0
    doc_emb = fwd.embeddings[:n_main]  # [P*G, H]
    query_emb = fwd.embeddings[n_main:n_main + n_prompts]  # [P, H]
    neg_emb = fwd.embeddings[n_main + n_prompts:] if use_negatives else None  # [P, H]

    # 4-5. Reward each main rollout; advantages relative to its group.
    main = rollouts.rows(slice(0, n_main))
    rewards = compute_rewards(doc_emb, query_emb, neg_emb, main.truncated, cfg, mode)
    advantages, frac_zero_std = compute_advantages(rewards.total, group, cfg.scale_std)  # [P*G]

    # 6. Policy update on the main rollouts: mini-batches of prompts, micro-batches by token budget.
    old_logprobs = fwd.old_logprobs[:n_main]
    ref_logprobs = None
    if policy.ref_model is not None:
        with autocast(policy):
            ref_logprobs = forward_rollouts(policy.ref_model, main, cfg.max_tokens_per_microbatch,
                                            cfg.logprob_chunk).old_logprobs
    model.train()
    lm_head = model.get_output_embeddings().weight
    rows_per_update = cfg.mini_batch_size * group
    stats = {"loss": 0.0, "clip_frac_sum": 0.0, "kl_sum": 0.0, "grad_norm": 0.0, "skipped_updates": 0}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        for start in range(0, n_main, rows_per_update):
            update_rows = torch.arange(start, start + rows_per_update, device=main.ids.device)
            token_count = int(main.response_mask[update_rows].sum().clamp(min=1))
            for micro in microbatches(main.attention[update_rows].sum(-1), cfg.max_tokens_per_microbatch):
                rows = update_rows[micro.to(update_rows.device)]
                part, cols = trim(main.rows(rows))
                with autocast(policy):
                    hidden = policy_forward(model, part.ids, part.attention)
                    logprobs = response_logprobs(hidden, lm_head, part.ids, part.response_mask, cfg.logprob_chunk)
                loss, s = policy_loss(logprobs, old_logprobs[rows][:, cols], advantages[rows], part.response_mask,
                                      cfg.clip_eps, token_count,
                                      ref_logprobs[rows][:, cols] if ref_logprobs is not None else None, cfg.kl_coef)
                loss.backward()
                stats["loss"] += loss.item()
                stats["clip_frac_sum"] += s["clip_frac_sum"]
                stats["kl_sum"] += s.get("kl_sum", 0.0)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:  # a non-finite gradient would poison the weights: drop this update, count it
                stats["skipped_updates"] += 1
            optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"] += float(grad_norm)
            n_updates += 1
    scheduler.step()

    step_time = time.perf_counter() - t0
    response_tokens = int(rollouts.response_mask.sum())
    n_tokens = int(main.response_mask.sum().clamp(min=1)) * cfg.ppo_epochs
    metrics = {
        "reward_mean": float(rewards.total.mean()),
        "reward_std": float(rewards.total.std()),
        **{f"reward_{name}": float(v.mean()) for name, v in rewards.parts.items()},
        "advantage_abs_mean": float(advantages.abs().mean()),
        "frac_zero_std_groups": frac_zero_std,
        "clip_frac": stats["clip_frac_sum"] / n_tokens,
        "kl": stats["kl_sum"] / n_tokens,
        "loss": stats["loss"] / n_updates,
        "grad_norm": stats["grad_norm"] / n_updates,
        "skipped_updates": stats["skipped_updates"],
        "response_len_mean": float(main.response_lengths.float().mean()),
        "truncated_frac": float(main.truncated.float().mean()),
        "prompt_truncated_frac": float(rollouts.prompt_truncated.float().mean()),
        "emb_cross_cos_mean": cross_text_cosine(doc_emb, group),
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": response_tokens / step_time,
        "rollout_time_s": t_rollout,
        "step_time_s": step_time,
    }
    sample = {"examples": examples, "rationales": tokenizer.batch_decode(main.responses(), skip_special_tokens=True),
              "rewards": rewards.total.tolist()}
    return metrics, sample


# ---------------------------------------------------------------------------------------------
# Evaluation and logging


def evaluate(policy: Policy, heldout: list[Example], cfg: GraceConfig, corpus) -> tuple[dict, list[dict]]:
    """Held-out retrieval with greedy rationales → ({eval_*: value}, a few example rationales)."""
    if not heldout:
        return {}, []
    with autocast(policy):
        metrics, doc_rationales, _ = heldout_retrieval(
            policy.model, policy.tokenizer, heldout, max_new_tokens=cfg.max_new_tokens,
            max_prompt_len=cfg.max_prompt_len)
    out = {f"eval_{k}": v for k, v in metrics.items()}
    if corpus is not None:  # built-in data knows each text's topic: how often does the rationale name it?
        from .builtin import rationale_topic
        rows = corpus.heldout[:len(heldout)]
        named = [rationale_topic(r, corpus) == row["topic"] for r, row in zip(doc_rationales, rows)]
        out["eval_rationale_topic_acc"] = sum(named) / len(named)
    examples = [{"text": ex.text, "rationale": r} for ex, r in zip(heldout[:3], doc_rationales[:3])]
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


def main(cfg: GraceConfig, resume: str = "") -> dict:
    """Run GRACE training with `cfg`; returns the summary (also written to <out>/summary.json)."""
    from tqdm.auto import tqdm

    if resume:
        cfg, out_dir, resume_from = _resume_target(cfg, resume)
    else:
        out_dir = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        resume_from = None
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"--out {out_dir}: not writable")
    seed_everything(cfg.seed)

    train_examples, heldout, mode, corpus = load_data(cfg, out_dir)
    batches = PromptBatches(train_examples, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    write_json(os.path.join(out_dir, "config.json"), {**cfg.to_dict(), "resolved_mode": mode})

    device = resolve_device(cfg.device)
    model_dtype = resolve_dtype(cfg.dtype, device)
    # Train fp32 weights (AdamW state stays exact) and compute in bf16/fp16 under autocast on GPU.
    model, tokenizer = load_model(resume_from or cfg.model, cfg.device, "fp32")
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    policy = Policy(model, tokenizer, ref_model, model_dtype if device.type == "cuda" and model_dtype != torch.float32 else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    start_step = 0
    if resume_from:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])
        generator.set_state(state["generator"])
        start_step = state["step"]
        print(f"resuming {out_dir} from step {start_step} ({resume_from})")

    # Ctrl-C / SIGTERM: finish the current step, save, exit cleanly. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, saving, then stopping "
                   f"(press Ctrl-C again to abort now)")

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log = RunLog(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GRACE {mode} · model {cfg.model} ({n_params / 1e6:.2f}M params) · {len(train_examples)} train / "
          f"{len(heldout)} held-out examples · {total_steps} steps × {cfg.batch_size} prompts × G={cfg.group_size} "
          f"· reward {cfg.reward} · {device} → {out_dir}")

    before = {}
    if start_step == 0:
        before, examples_before = evaluate(policy, heldout, cfg, corpus)
        log.metric({"step": 0, **before})
    else:
        before = state.get("eval_before", {})

    def trainer_state(step):
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "batches": batches.state_dict(), "rng": rng_state(), "generator": generator.get_state(),
                "step": step, "config": cfg.to_dict(), "eval_before": before}

    reward_means, step, loop_started = [], start_step, time.perf_counter()
    try:
        bar = tqdm(range(start_step, total_steps), desc="GRACE", initial=start_step, total=total_steps)
        for step in bar:
            metrics, sample = grace_step(policy, optimizer, scheduler, next(batches), cfg, mode, generator)
            reward_means.append(metrics["reward_mean"])
            row = {"step": step + 1, "epoch": batches.epoch, **metrics}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
                row.update(evaluate(policy, heldout, cfg, corpus)[0])
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                log.metric(row)
            if (step + 1) % (10 * cfg.log_every) == 0 or step == start_step:
                log.sample(step + 1, sample, cfg.group_size)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", pos=f"{metrics['reward_positive']:.3f}",
                            cross=f"{metrics['emb_cross_cos_mean']:.3f}", len=f"{metrics['response_len_mean']:.1f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                save_checkpoint(os.path.join(out_dir, f"checkpoint-{step + 1:06d}"), model, tokenizer,
                                trainer_state(step + 1))
            if stop["requested"]:
                break
        bar.close()
        done = step + 1
        train_seconds = time.perf_counter() - loop_started
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)

    if stop["requested"] and done < total_steps:
        path = save_checkpoint(os.path.join(out_dir, f"checkpoint-{done:06d}"), model, tokenizer, trainer_state(done))
        print(f"stopped at step {done}/{total_steps}; saved {path}. Continue with: python train.py --resume {out_dir}")
        log.close()
        return {"stopped_at": done, "checkpoint": path}

    after, examples_after = evaluate(policy, heldout, cfg, corpus)
    log.metric({"step": done, **after})
    log.close()
    final = save_checkpoint(os.path.join(out_dir, "checkpoint-final"), model, tokenizer, trainer_state(done))
    summary = {"steps": done, "mode": mode, "reward_first10": _mean(reward_means[:10]),
               "reward_last10": _mean(reward_means[-10:]), "train_seconds": round(train_seconds, 1),
               "threads": torch.get_num_threads(), "eval_before": before, "eval_after": after,
               "checkpoint": final}
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


def _resume_target(cfg: GraceConfig, resume: str) -> tuple[GraceConfig, str, str]:
    """--resume RUN_DIR|latest → (the run's config, run dir, checkpoint to load)."""
    if resume == "latest":
        runs = sorted((os.path.join("runs", d) for d in os.listdir("runs")), key=os.path.getmtime) \
            if os.path.isdir("runs") else []
        if not runs:
            raise FileNotFoundError("--resume latest: no runs under ./runs")
        resume = runs[-1]
    ckpt = latest_checkpoint(resume)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint-NNNNNN directory in it")
    saved = load_trainer_state(ckpt)["config"]
    return GraceConfig(**saved), resume, ckpt
