"""GRACE training steps: minigrace's trainer vs TRL's GRPOTrainer, same model, data, settings and reward.

    python bench/train_step.py               # 120 steps each (the tiny recipe), about 15 min on 2 CPU cores
    python bench/train_step.py --quick       # 8 steps each, 48 held-out queries: a smoke run
    python bench/train_step.py --steps 40 --grace-flags "--lr 1e-4" --out bench/results/train_step-lr1e-4.json

Both trainers train the built-in tiny model (`minigrace.worlds.builtin.load_tiny`) on the built-in train data, in
the same prompt order, with the tiny recipe of minigrace/config.py (when written: 16 prompts per step,
G=8, 16 new tokens, temperature 1.0, lr 2e-3 constant AdamW, weight decay 0, grad clip 1.0, beta=0,
eps=0.2, one update per batch, token-mean loss, advantages = reward - group mean; --grace-flags
overrides any of it for both), and the same GRACE reward:

  minigrace  `grace_step` driven as minigrace/train.py main does (no logging files, no checkpoints).
  trl        GRPOTrainer with the reward written as a TRL user would: the reward function receives the
             completions as text, samples the query rationales (and the hard-negative ones when the reward reads
             them, as minigrace) with the policy (temperature 0.5, one each, as GRACE), re-templates and
             re-tokenizes every prompt + completion,
             runs the model with output_hidden_states, mean-pools after the system prompt, and scores with
             `minigrace.kernels.grace_reward` (the same math, weights and length penalty as minigrace).

Each trainer runs in its own child process, one after the other, so peak RSS is per trainer. Step
times are wall-clock per optimizer step (generation, reward, update, logging); medians are taken after
`--warmup-steps`. Children use one torch thread by default (`--threads`): on a shared machine wall
time depends on the neighbours' load, so the CPU seconds per step (process_time) are printed as well.
"generated tok/s" counts every sampled token of a step (main, query and negative rationales, EOS
included) over the step time. After training, both models get the same held-out
retrieval eval (`minigrace.train.evaluate`: greedy rationales, recall@1 / MRR@10 / nDCG@10 on the
built-in held-out split), and so does the untrained model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/train_step.py` from anywhere

import torch

from bench.common import check_out
from bench.common import PeakRSS, device_name, emit, fmt, mib, process_peak_rss, rss_bytes, run_child, summarize, write_json

TRAINERS = ("minigrace", "trl")


# ----------------------------------------------------------------------------- shared setup
def make_config(args):
    """The GraceConfig `python train.py --max-steps N` would use (the tiny preset), plus our overrides."""
    from minigrace.config import parse_args as grace_args

    argv = ["--max-steps", str(args.steps), "--seed", str(args.seed), "--eval-size", str(args.eval_size),
            "--device", "cpu"]
    if args.prompts:
        argv += ["--batch-size", str(args.prompts), "--mini-batch-size", str(args.prompts)]
    cfg, _ = grace_args(argv + args.grace_flags.split())
    return cfg


def setup(args, out_dir: str):
    """(cfg, held-out examples, mode, corpus, the prompt batches of every step, model, tokenizer)."""
    from minigrace.data import PromptBatches
    from minigrace.models import load_model
    from minigrace.train import load_data, seed_everything

    cfg = make_config(args)
    seed_everything(cfg.seed)
    train, heldout, mode, corpus = load_data(cfg, out_dir)
    batches = PromptBatches(train, cfg.batch_size, cfg.seed)
    step_batches = [next(batches) for _ in range(cfg.max_steps)]  # the same prompts, in the same order, for both
    model, tokenizer = load_model(cfg.model, "cpu", "fp32")
    return cfg, heldout, mode, corpus, step_batches, model, tokenizer


def evaluate(model, tokenizer, heldout, cfg, corpus) -> dict:
    from minigrace.step import Policy
    from minigrace.train import evaluate as grace_evaluate

    t0 = time.perf_counter()
    metrics, _ = grace_evaluate(Policy.single_process(model, tokenizer), heldout, cfg, corpus)
    return {**metrics, "eval_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- minigrace
def run_minigrace(args, out_dir: str) -> dict:
    from minigrace.metrics import step_metrics
    from minigrace.step import Policy, grace_step

    cfg, heldout, mode, corpus, step_batches, model, tokenizer = setup(args, out_dir)
    policy = Policy.single_process(model, tokenizer)  # CPU: fp32, no autocast (as main() on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)

    step_s, cpu_s, rewards, gen_tokens, parts = [], [], [], [], []
    rss_setup = rss_bytes()
    with PeakRSS() as mem:
        for examples in step_batches:
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = step_metrics(grace_step(policy, optimizer, scheduler, examples, cfg, mode, generator),
                                   scheduler.get_last_lr()[0])
            step_s.append(time.perf_counter() - t0)
            cpu_s.append(time.process_time() - c0)
            rewards.append(metrics["reward_mean"])
            gen_tokens.append(round(metrics["tokens_per_s"] * metrics["step_time_s"]))
            parts.append({k: metrics[k] for k in ("rollout_time_s", "response_len_mean", "truncated_frac",
                                                  "emb_cross_cos_mean")})
    return dict(step_s=step_s, cpu_s=cpu_s, rewards=rewards, gen_tokens=gen_tokens, details=parts, rss_setup=rss_setup,
                peak_rss_train=mem.peak, memory_method=mem.method,
                eval=evaluate(model, tokenizer, heldout, cfg, corpus), config=cfg.to_dict())


# ----------------------------------------------------------------------------- TRL
def grace_reward_for_trl(model, tokenizer, cfg, log: dict):
    """GRACE's reward as a TRL reward function: text in, one float per completion out.

    A TRL reward function sees the prompts and the decoded completions (plus the dataset's other
    columns), not token ids or hidden states, so it re-templates, re-tokenizes and runs the model itself.
    """
    from minigrace.kernels import grace_reward, masked_mean_pool
    from minigrace.prompts import chat_prompt, render_chat
    from minigrace.reward import reward_weights
    from minigrace.rollout import eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    G = cfg.group_size
    weights = reward_weights(cfg.reward, cfg.w_positive, cfg.w_negative, cfg.w_consistency, cfg.w_cross_group,
                             cfg.w_discriminative)

    def as_text(completion) -> str:  # conversational completions are [{"role": "assistant", "content": ...}]
        return completion[0]["content"] if isinstance(completion, list) else completion

    @torch.no_grad()
    def sample_rationales(texts: list[str]) -> tuple[list[str], list[bool], int]:
        """One rationale per text at the auxiliary temperature: (texts, ended with EOS, tokens sampled)."""
        enc = tokenizer([render_chat(tokenizer, t) for t in texts], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False)
        out = model.generate(**enc, do_sample=True, temperature=cfg.aux_temperature, top_p=cfg.top_p, top_k=0,
                             max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        new = out[:, enc["input_ids"].shape[1]:]
        is_eos = torch.isin(new, torch.tensor(eos))
        ended = is_eos.any(1)
        length = torch.where(ended, is_eos.int().argmax(1) + 1, torch.full_like(ended, new.shape[1], dtype=torch.long))
        return tokenizer.batch_decode(new, skip_special_tokens=True), ended.tolist(), int(length.sum())

    @torch.no_grad()
    def embed(texts: list[str], completions: list[str], ended: list[bool]) -> torch.Tensor:
        """Re-template + re-tokenize prompt and completion, forward, mean-pool after the system prompt."""
        seqs, starts = [], []
        for text, completion, done in zip(texts, completions, ended):
            prompt = chat_prompt(tokenizer, text, cfg.max_prompt_len)
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if done else [])
            seqs.append(prompt.ids + ids)
            starts.append(prompt.pool_start)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):  # right padding, as TRL pads reward-model inputs: positions stay 0..n-1
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
        pool_mask = (torch.arange(width)[None, :] >= torch.tensor(starts)[:, None]) & attention.bool()
        hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        return masked_mean_pool(hidden, pool_mask, normalize=True).float()

    def grace_reward_fn(prompts, completions, completion_ids, query, negative, **kwargs) -> list[float]:
        n = len(completions)
        texts = [p[-1]["content"] for p in prompts]  # the user message: the positive document
        assert n % G == 0 and all(texts[i] == texts[i - i % G] for i in range(n)), "TRL groups must be contiguous"
        P = n // G
        main_text = [as_text(c) for c in completions]
        main_ended = [len(ids) > 0 and ids[-1] in eos for ids in completion_ids]
        negatives = [negative[g * G] for g in range(P)] if weights.negative else []  # as minigrace: only if read
        aux_inputs = [query[g * G] for g in range(P)] + negatives
        aux_text, aux_ended, aux_tokens = sample_rationales(aux_inputs)
        emb = embed(texts + aux_inputs, main_text + aux_text, main_ended + aux_ended)
        total, _ = grace_reward(emb[:n], emb[n:n + P], emb[n + P:] if negatives else None, G, cfg.tau, weights,
                                mode="supervised")
        truncated = torch.tensor([not e for e in main_ended])
        total = torch.where(truncated, torch.full_like(total, cfg.length_penalty), total)
        log["rewards"].append(float(total.mean()))
        log["gen_tokens"].append(sum(len(ids) for ids in completion_ids) + aux_tokens)
        return total.tolist()

    return grace_reward_fn


def run_trl(args, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minigrace.prompts import SYSTEM_PROMPT

    cfg, heldout, mode, corpus, step_batches, model, tokenizer = setup(args, out_dir)
    if mode != "supervised":
        raise ValueError("this benchmark's TRL reward is written for supervised (query, positive, negative) data")
    rows = [{"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ex.text}],
             "query": ex.query, "negative": ex.negative} for examples in step_batches for ex in examples]
    log = {"rewards": [], "gen_tokens": []}
    reward_fn = grace_reward_for_trl(model, tokenizer, cfg, log)

    class StepTimer(TrainerCallback):
        """Wall clock between optimizer steps (generation + reward + loss + update + TRL's logging)."""

        def __init__(self):
            self.step_s, self.cpu_s, self.last = [], [], None

        def on_train_begin(self, *a, **k):
            self.last = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            now = (time.perf_counter(), time.process_time())
            self.step_s.append(now[0] - self.last[0])
            self.cpu_s.append(now[1] - self.last[1])
            self.last = now

    timer = StepTimer()
    completions = cfg.mini_batch_size * cfg.group_size  # of one optimizer update (all of a step's: one update)
    micro = args.trl_micro_batch or completions  # per_device_train_batch_size counts completions, not prompts
    if completions % micro:
        raise ValueError(f"--trl-micro-batch {micro} must divide the {completions} completions of an update")
    trl_args = GRPOConfig(
        output_dir=os.path.join(out_dir, "trl"), max_steps=cfg.max_steps, seed=cfg.seed,
        per_device_train_batch_size=micro, gradient_accumulation_steps=completions // micro,
        generation_batch_size=cfg.batch_size * cfg.group_size,  # one generation (and reward call) per step
        num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="constant", warmup_steps=cfg.warmup_steps,
        optim="adamw_torch", max_grad_norm=cfg.grad_clip,
        beta=cfg.kl_coef, epsilon=cfg.clip_eps, num_iterations=cfg.ppo_epochs,
        loss_type="dapo",  # token mean over the batch's completion tokens (minigrace: token_count of the mini-batch)
        scale_rewards="group" if cfg.scale_std else "none",  # Dr.GRPO: reward - group mean
        shuffle_dataset=False,  # rows are already in minigrace's order
        use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=trl_args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[timer])
    rss_setup = rss_bytes()
    with PeakRSS() as mem:
        trainer.train()
    return dict(step_s=timer.step_s, cpu_s=timer.cpu_s, rewards=log["rewards"], gen_tokens=log["gen_tokens"], rss_setup=rss_setup,
                peak_rss_train=mem.peak, memory_method=mem.method,
                eval=evaluate(trainer.model, tokenizer, heldout, cfg, corpus),
                trl_settings={k: getattr(trl_args, k) for k in (
                    "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
                    "max_completion_length", "temperature", "top_p", "top_k", "learning_rate", "weight_decay",
                    "lr_scheduler_type", "optim", "max_grad_norm", "beta", "epsilon", "num_iterations", "loss_type",
                    "scale_rewards")})


def run_base(args, out_dir: str) -> dict:
    cfg, heldout, mode, corpus, _, model, tokenizer = setup(args, out_dir)
    return dict(eval=evaluate(model, tokenizer, heldout, cfg, corpus))


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train_step-") as out_dir:
        t0 = time.perf_counter()
        result = {"minigrace": run_minigrace, "trl": run_trl, "base": run_base}[args.child](args, out_dir)
    result.update(process_peak_rss=process_peak_rss(), wall_s=time.perf_counter() - t0, threads=torch.get_num_threads())
    emit(result)


# ----------------------------------------------------------------------------- parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (default 120; --quick 8)")
    p.add_argument("--quick", action="store_true", help="8 steps, 48 held-out queries")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {','.join(TRAINERS)}")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps left out of the medians (default 2; 1 with --quick)")
    p.add_argument("--prompts", type=int, default=0, help="prompts per step (default: the tiny preset's 16)")
    p.add_argument("--grace-flags", default="",
                   help='extra minigrace train.py flags for both trainers\' shared config, e.g. '
                        '"--max-tokens-per-microbatch 2048" (minigrace-only knobs do not change TRL)')
    p.add_argument("--trl-micro-batch", type=int, default=0,
                   help="TRL per_device_train_batch_size (completions per forward/backward; gradient accumulation "
                        "makes up one update per step). Default: all completions of the step at once, like "
                        "minigrace's single micro-batch at the tiny preset")
    p.add_argument("--eval-size", type=int, default=None, help="held-out queries for the retrieval eval (default 200)")
    p.add_argument("--no-base-eval", action="store_true", help="skip the untrained model's eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per child (default 1: steadier medians on a shared machine, and CPU "
                        "seconds then count work, not spinning; 0 = torch's default)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train_step-<device>.json)")
    p.add_argument("--child", choices=(*TRAINERS, "base"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_out(p, args.out)
    args.steps = args.steps or (8 if args.quick else 120)
    args.eval_size = args.eval_size or (48 if args.quick else 200)
    if args.warmup_steps is None:
        args.warmup_steps = min(1 if args.quick else 2, args.steps - 1)
    args.trainer_list = [t.strip() for t in args.trainers.split(",") if t.strip()]
    bad = [t for t in args.trainer_list if t not in TRAINERS]
    if bad:
        p.error(f"--trainers: unknown {bad}; choose from {TRAINERS}")
    if args.steps < 1 or args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        p.error("need --steps ≥ 1 and 0 ≤ --warmup-steps < --steps")
    return args


def child_argv(args, which: str) -> list[str]:
    argv = [__file__, "--child", which, "--steps", str(args.steps), "--seed", str(args.seed),
            "--eval-size", str(args.eval_size), "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
            "--trl-micro-batch", str(args.trl_micro_batch), f"--grace-flags={args.grace_flags}"]
    return argv + (["--prompts", str(args.prompts)] if args.prompts else [])


def summarize_trainer(name: str, r: dict, warmup: int) -> dict:
    """Per-trainer row: timing after warm-up, throughput, memory, reward curve, eval."""
    steps = r["step_s"][warmup:]
    t, c = summarize(steps), summarize(r["cpu_s"][warmup:])
    tokens = r["gen_tokens"][warmup:]
    tok_per_s = statistics.median([n / s for n, s in zip(tokens, steps)]) if tokens else None
    k = max(1, min(10, len(r["rewards"]) // 4))
    return dict(trainer=name, steps=len(r["step_s"]), median_step_s=t["median"], p20_step_s=t["p20"],
                p80_step_s=t["p80"], steps_per_s=1 / t["median"], median_cpu_s=c["median"],
                gen_tokens_per_s=tok_per_s, threads=r["threads"], load_avg=r.get("load_avg"),
                peak_rss_mib=mib(r["peak_rss_train"]), setup_rss_mib=mib(r["rss_setup"]),
                train_rss_delta_mib=mib(r["peak_rss_train"] - r["rss_setup"]),
                process_peak_rss_mib=mib(r["process_peak_rss"]),
                reward_first=statistics.mean(r["rewards"][:k]), reward_last=statistics.mean(r["rewards"][-k:]),
                reward_window=k, reward_curve=r["rewards"], step_s=r["step_s"], cpu_s=r["cpu_s"], gen_tokens=r["gen_tokens"],
                eval=r["eval"], wall_s=r["wall_s"], memory_method=r["memory_method"],
                **{k2: r[k2] for k2 in ("details", "trl_settings", "config") if k2 in r})


DIFFERENCES = [
    "same prompts in the same order (TRL's dataset is pre-ordered as minigrace's batches, shuffle off); both "
    "process the step's 128 main completions in one forward/backward unless --trl-micro-batch / --grace-flags say otherwise",
    "sampling: both sample from the same softmax (temperature 1.0, top_p 1, no top_k) but with different RNG "
    "streams and code (minigrace's KV-cache loop vs transformers' generate), so the rationales differ",
    "query/negative rationales: minigrace samples them in the same batched generation as the main ones; the TRL "
    "reward function samples them with a second model.generate call",
    "embeddings: minigrace pools the sampled tokens from the forward that also gives the old log-probs; the TRL "
    "reward decodes, re-templates and re-tokenizes (BPE may re-split a decoded rationale) and runs a separate "
    "forward with output_hidden_states (which also computes the logits)",
    "old log-probs: TRL skips them when generation and update are aligned (ratio = 1 by detach); minigrace "
    "computes them in its embedding forward (ratio = 1 up to float error). Same gradient",
    "loss forward: TRL computes per-token entropy as well (logged); minigrace computes log-probs in token chunks "
    "from the hidden states",
    "optimizer: both torch AdamW (foreach), same lr / betas / eps / weight decay / grad clip; TRL's Trainer adds "
    "its own logging and callbacks per step",
]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    print(f"device: {device_name('cpu')} | torch {torch.__version__} | {args.steps} steps per trainer, medians after "
          f"{args.warmup_steps} warm-up step(s) | {args.threads or 'default'} thread(s) | each trainer in its own "
          f"child process" + (f" | minigrace flags: {args.grace_flags}" if args.grace_flags else "")
          + (f" | TRL micro-batch {args.trl_micro_batch}" if args.trl_micro_batch else ""))
    from minigrace.worlds.builtin import load_tiny
    tiny_model = load_tiny()[0].name_or_path  # build it here if its cache is missing, never inside a timed child
    raw, errors = {}, {}
    runs = list(args.trainer_list) + ([] if args.no_base_eval else ["base"])
    for which in runs:
        t0 = time.perf_counter()
        print(f"  running {which} ...", flush=True)
        load_before = os.getloadavg()[0]
        r = run_child(child_argv(args, which), timeout=args.timeout)
        r["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        if "error" in r:
            errors[which] = r["error"]
            print(f"  {which}: {r['error']}\n{r.get('stderr_tail', '')[-2000:]}")
        else:
            raw[which] = r
            print(f"  {which} done in {time.perf_counter() - t0:.0f}s", flush=True)

    rows = [summarize_trainer(name, raw[name], args.warmup_steps) for name in args.trainer_list if name in raw]
    base_eval = raw.get("base", {}).get("eval")
    print()
    header = (f"{'trainer':<10} {'median s/step':>13} {'p20-p80':>13} {'steps/s':>8} {'CPU s/step':>10} "
              f"{'gen tok/s':>9} {'peak RSS MiB':>12} {'train +MiB':>10} {'reward first→last':>18} "
              f"{'recall@1':>8} {'mrr@10':>7} {'ndcg@10':>7} {'topic acc':>9} {'load avg':>10}")
    print(header)
    print("-" * len(header))

    def eval_cols(e):
        return (f"{fmt(e.get('eval_recall@1'), '.3f'):>8} {fmt(e.get('eval_mrr@10'), '.3f'):>7} "
                f"{fmt(e.get('eval_ndcg@10'), '.3f'):>7} {fmt(e.get('eval_rationale_topic_acc'), '.3f'):>9}")

    if base_eval:
        print(f"{'untrained':<10} {'':>13} {'':>13} {'':>8} {'':>10} {'':>9} {'':>12} {'':>10} {'':>18} "
              f"{eval_cols(base_eval)}")
    for r in rows:
        load = "{:.1f}→{:.1f}".format(*r["load_avg"]) if r.get("load_avg") else "-"
        print(f"{r['trainer']:<10} {r['median_step_s']:>13.3f} {r['p20_step_s']:>6.3f}-{r['p80_step_s']:<6.3f} "
              f"{r['steps_per_s']:>8.3f} {r['median_cpu_s']:>10.3f} {fmt(r['gen_tokens_per_s'], '.0f'):>9} "
              f"{r['peak_rss_mib']:>12.0f} {r['train_rss_delta_mib']:>10.0f} "
              f"{r['reward_first']:>8.3f} → {r['reward_last']:<7.3f} {eval_cols(r['eval'])} {load:>10}")
    for name, why in errors.items():
        print(f"{name:<10} n/a: {why}")

    by = {r["trainer"]: r for r in rows}
    comparison = {}
    if "minigrace" in by and "trl" in by:
        m, t = by["minigrace"], by["trl"]
        speed = m["steps_per_s"] / t["steps_per_s"]
        cpu_speed = t["median_cpu_s"] / m["median_cpu_s"]
        memory = m["peak_rss_mib"] / t["peak_rss_mib"]
        delta = m["train_rss_delta_mib"] / t["train_rss_delta_mib"] if t["train_rss_delta_mib"] > 0 else None
        comparison = dict(steps_per_s_ratio=speed, cpu_time_ratio=cpu_speed, peak_rss_ratio=memory,
                          train_rss_delta_ratio=delta, target_speed_ge_1_5x=speed >= 1.5,
                          target_peak_le_0_7x=memory <= 0.7)
        print(f"\nminigrace vs TRL: {speed:.2f}x steps/s (target ≥ 1.5x: {'met' if speed >= 1.5 else 'missed'}; "
              f"{cpu_speed:.2f}x by CPU seconds per step), {memory:.2f}x peak RSS "
              f"(target ≤ 0.7x: {'met' if memory <= 0.7 else 'missed'}); training-only RSS growth {fmt(delta, '.2f')}x")
        print("reward curve (mean reward of every step, averaged over blocks of 10 steps):")
        for r in rows:
            curve = r["reward_curve"]
            blocks = [statistics.mean(curve[i:i + 10]) for i in range(0, len(curve), 10)]
            print(f"  {r['trainer']:<10} " + " ".join(f"{b:6.2f}" for b in blocks))
    print("peak RSS: the child's peak resident set during training (VmHWM reset after setup: imports, model, data "
          "and trainer construction are in it); train +MiB: that peak minus the RSS after setup")
    print("remaining differences:\n  - " + "\n  - ".join(DIFFERENCES))

    meta = dict(steps=args.steps, warmup_steps=args.warmup_steps, seed=args.seed, eval_size=args.eval_size,
                grace_flags=args.grace_flags, trl_micro_batch=args.trl_micro_batch, tiny_model=tiny_model,
                memory_method="CPU: VmHWM of the trainer's child process during training (reset via "
                              "/proc/self/clear_refs after setup); train_rss_delta = that minus RSS after setup",
                step_time="wall clock per optimizer step, perf_counter; medians after warm-up; CPU s = "
                          "time.process_time of the child over the step",
                threads=args.threads or torch.get_num_threads(),
                differences=DIFFERENCES, comparison=comparison, errors=errors)
    path = write_json("train_step", "cpu", meta, dict(trainers=rows, untrained_eval=base_eval), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
