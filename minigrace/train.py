"""Train: the harness around step.py. Config → data → policy → loop → summary.

The GRACE algorithm is `step.grace_step`; everything here is what a training run needs around it:
the run directory and resuming, the policy (LoRA, gradient checkpointing, KL reference, DDP/FSDP),
Ctrl-C / SIGTERM, checkpoints, the evaluation schedule, metrics.jsonl / samples.jsonl and the summary.
Under torchrun every rank runs this; rank 0 logs and writes (parallel.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import lora, models, parallel
from .checkpoint import (STATE_FILE, CheckpointError, claim_run_dir, link_checkpoint, load_trainer_state,
                         prune_checkpoints, resume_checkpoint, rng_state, save_checkpoint, set_generator_state,
                         set_rng_state, sharded_dir, write_json)
from .config import GraceConfig, flag, resume_conflicts
from .data import DataError, Example, PromptBatches, check_source, load_examples, split_heldout
from .eval import MtebEncoder, heldout_retrieval, load_tasks, run_tasks
from .metrics import step_metrics
from .models import check_model, load_model, model_source
from .plot import TensorBoardLog, write_run_plot
from .reward import compute_rewards
from .step import Policy, StepResult, grace_step
from .worlds.builtin import builtin_corpus, rationale_topic
from .worlds import everyday, realtext


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); a checkpoint was saved."""


def main(cfg: GraceConfig, resume: str = "", reward_fn=compute_rewards) -> dict:
    """Run GRACE training with `cfg`; returns the summary (also written to <out>/summary.json).

    resume: a run directory whose newest checkpoint to continue from (`cfg` is that run's config, as
    `config.parse_args` builds it for --resume). reward_fn: compute_rewards or a function with its
    signature. Under torchrun every rank calls this; rank 0 logs and saves (parallel.py).
    """
    ranks = parallel.setup(cfg.device)
    quiet_transformers()
    try:
        return train_run(cfg, resume, reward_fn, ranks)
    finally:
        parallel.teardown(ranks)  # after train_run's frame, and the model in it, are gone


def train_run(cfg: GraceConfig, resume: str, reward_fn, ranks: parallel.Ranks) -> dict:
    check_inputs(cfg, resume)  # a mistake in a path stops the run before anything is written
    with open_run_dir(cfg, resume, ranks) as (out_dir, resume_from):  # locked until the run ends (issue #16)
        with StopOnSignal(ranks.is_main) as stop:  # from the start: a SIGTERM while loading still saves
            run = start_run(cfg, ranks, out_dir, resume_from)
            train_seconds, reward_means = train_loop(run, reward_fn, stop)
        if stop.requested and run.step < run.total_steps:
            return stop_early(run)
        return finish(run, train_seconds, reward_means)


def quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights", "Writing model shards") would interleave with
    ours on every load and checkpoint: off. Its warnings stay."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Setting up a run


@dataclass
class Run:
    """Everything a running training holds; a checkpoint saves what is needed to continue it exactly."""
    cfg: GraceConfig
    out_dir: str
    mode: str  # supervised | unsupervised
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: PromptBatches
    generator: torch.Generator  # rollout sampling noise; on CPU: the same rollouts, and resumable, on any device
    heldout: list[Example]
    corpus: object  # the built-in corpus (it knows each text's topic) or None
    tasks: list  # mteb tasks of --eval-tasks
    total_steps: int
    n_train: int
    step: int = 0
    skipped_steps: int = 0
    eval_before: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # checkpoint-best's {"metric", "step", "value"}; {} before there is one
    log: "RunLog | None" = None  # rank 0 only


def start_run(cfg: GraceConfig, ranks: parallel.Ranks, out_dir: str, resume_from: str | None) -> Run:
    """Data, policy and optimizer in `out_dir`; restored from `resume_from` (a checkpoint) on --resume."""
    state = resume_state(cfg, out_dir, resume_from) if resume_from else None
    if cfg.batch_size % ranks.world or cfg.mini_batch_size % ranks.world:
        raise ValueError(f"--batch-size ({cfg.batch_size}) and --mini-batch-size ({cfg.mini_batch_size}) must be "
                         f"multiples of the number of processes ({ranks.world}): each rank takes an equal share")
    seed_everything(cfg.seed)
    train_examples, heldout, mode, corpus = load_data(cfg, out_dir, write_rejects=ranks.is_main)
    batches = PromptBatches(train_examples, cfg.batch_size, cfg.seed)
    if ranks.is_main:
        write_json(os.path.join(out_dir, "config.json"), {**cfg.to_dict(), "resolved_mode": mode})
    policy = build_policy(cfg, ranks, resume_from)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, **adamw_options(ranks.device, cfg.offload))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    run = Run(cfg, out_dir, mode, policy, optimizer, scheduler, batches,
              torch.Generator().manual_seed(cfg.seed), heldout, corpus, eval_tasks(cfg, ranks),
              total_steps=cfg.max_steps or cfg.epochs * batches.steps_per_epoch, n_train=len(train_examples),
              log=RunLog(out_dir, cfg.report_to) if ranks.is_main else None)
    if state is not None:
        restore(run, state)
        if ranks.is_main:
            print(f"resuming {out_dir} from step {run.step} ({resume_from})")
    print_banner(run)
    if run.step == 0:
        run.eval_before = evaluate_run(run)[0]
        if run.log:
            run.log.metric({"step": 0, **run.eval_before})
    return run


BUILTIN_DATA = ("builtin", "everyday", "realtext")  # --data names of the shipped sets (load_data)


def check_inputs(cfg: GraceConfig, resume: str = "") -> None:
    """DataError naming the flag / ModelNotAvailable, for a --data, --eval-data or --model that cannot load."""
    for name, path, mode in (("data", cfg.data, cfg.mode), ("eval_data", cfg.eval_data, "supervised")):
        if path and path not in BUILTIN_DATA:
            try:
                check_source(path, mode)
            except DataError as e:
                raise DataError(f"{flag(name)} {e}") from None
    if not resume:  # a resumed run loads its checkpoint
        check_model(cfg.model)


def adamw_options(device: torch.device, offload: bool = False) -> dict:
    """AdamW's implementation: fused on CUDA (one kernel over all parameters, a lower peak than the foreach
    default's temporaries); torch's default on CPU and for FSDP's CPU-offloaded shards (AdamW steps on CPU)."""
    return {"fused": True} if device.type == "cuda" and not offload else {}


@contextlib.contextmanager
def open_run_dir(cfg: GraceConfig, resume: str, ranks: parallel.Ranks):
    """(run directory, checkpoint to resume from or None), the directory locked while the run lasts.

    Rank 0 claims it (checkpoint.claim_run_dir: refused while another training holds it, or when it
    holds a run and this is neither --resume nor --overwrite) and on --resume picks the newest
    checkpoint that verifies (checkpoint.resume_checkpoint); every rank gets the outcome, so a refusal
    stops all of them."""
    out_dir = resume or ranks.broadcast(cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    lock, resume_from, refused = None, None, None
    if ranks.is_main:
        try:
            lock = claim_run_dir(out_dir, overwrite=cfg.overwrite and not resume, resuming=bool(resume))
            resume_from = resume_checkpoint(out_dir) if resume else None
        except (CheckpointError, OSError) as e:
            refused = e
    resume_from, refused = ranks.broadcast((resume_from, refused))
    try:
        if refused is not None:
            raise refused
        yield out_dir, resume_from
    finally:
        if lock is not None:
            lock.release()


def resume_state(cfg: GraceConfig, run_dir: str, checkpoint_dir: str) -> dict:
    """The checkpoint's trainer state, if it was trained with the same settings as `cfg`."""
    state = load_trainer_state(checkpoint_dir)
    conflicts = resume_conflicts(state["config"], cfg.to_dict())
    if conflicts:
        raise ValueError(f"--resume {run_dir}: the checkpoint was trained with a different config: "
                         f"{', '.join(conflicts)}")
    return {**state, "checkpoint_dir": checkpoint_dir}


def load_data(cfg: GraceConfig, out_dir: str, write_rejects: bool = True
              ) -> tuple[list[Example], list[Example], str, object]:
    """(train examples, held-out supervised examples, mode, builtin corpus or None)."""
    corpus = None
    rejects = os.path.join(out_dir, "rejected_rows.jsonl") if cfg.skip_bad_rows and write_rejects else None
    if cfg.data == "builtin":
        corpus = builtin_corpus(seed=0)
        mode = "supervised" if cfg.mode == "auto" else cfg.mode
        train, _ = load_examples(corpus.train, mode)
        heldout, _ = load_examples(corpus.heldout, "supervised")
    elif cfg.data == "everyday":  # the shipped real-language set: train split, held-out split for eval
        train, mode = load_examples(everyday.TRAIN_PATH, cfg.mode)
        heldout, _ = load_examples(cfg.eval_data or everyday.HELDOUT_PATH, "supervised")
    elif cfg.data == "realtext":  # Debian package descriptions and Python docs, split by source item
        train, mode = load_examples(realtext.TRAIN_PATH, cfg.mode)
        if mode == "unsupervised":  # the train positives (as load_examples takes them) + the other train texts
            train += load_examples(realtext.TEXTS_PATH, "unsupervised")[0]
        heldout, _ = load_examples(cfg.eval_data or realtext.HELDOUT_PATH, "supervised")
    else:
        train, mode = load_examples(cfg.data, cfg.mode, skip_bad_rows=cfg.skip_bad_rows, rejects_path=rejects)
        if cfg.eval_data:
            heldout, _ = load_examples(cfg.eval_data, "supervised")
        elif mode == "supervised" and cfg.eval_fraction > 0:
            train, heldout = split_heldout(train, cfg.eval_fraction, cfg.seed, max_heldout=cfg.eval_size)
        else:
            heldout = []  # unsupervised data has no queries: pass --eval-data to measure retrieval
    return train, heldout[:cfg.eval_size], mode, corpus


def eval_tasks(cfg: GraceConfig, ranks: parallel.Ranks) -> list:
    """The mteb tasks of --eval-tasks (a warning for each one that cannot run offline)."""
    if not cfg.eval_tasks:
        return []
    tasks, not_run = load_tasks([t.strip() for t in cfg.eval_tasks.split(",") if t.strip()])
    for why in not_run.values():
        if ranks.is_main:
            print(f"warning: --eval-tasks: {why}")
    return tasks


def build_policy(cfg: GraceConfig, ranks: parallel.Ranks, resume_from: str | None) -> Policy:
    """Load the model (+ LoRA adapters), gradient checkpointing, the KL reference, DDP / FSDP."""
    device = ranks.device
    compute_dtype = models.compute_dtype(cfg.dtype, device)
    # Train fp32 weights (AdamW state stays exact) and compute in bf16 under autocast (--dtype bf16, GPU or CPU).
    weights_from = None if sharded_dir(resume_from) else resume_from  # sharded: loaded after wrapping (restore)
    if cfg.lora_r:
        base, tokenizer = load_model(cfg.model, str(device), lora.base_dtype(compute_dtype))  # frozen: no fp32 copy
        module = lora.add_adapters(base, cfg, weights_from)
    else:
        module, tokenizer = load_model(weights_from or cfg.model, str(device), "fp32")
    if cfg.grad_checkpointing:  # non-reentrant: works with a frozen base (LoRA) too
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if cfg.kl_coef > 0 and not cfg.lora_r:  # the KL reference is the initial model, also on --resume
        initial = load_model(cfg.model, str(device), "fp32")[0] if weights_from else copy.deepcopy(module)
        ref_model = initial.eval().requires_grad_(False)
    vllm = None
    if cfg.rollout == "vllm":
        from .vllm_rollout import make_vllm_rollout  # vllm is optional (GPU only)
        vllm = make_vllm_rollout(cfg, model_source(cfg.model), device, ranks.distributed, bool(cfg.lora_r))
    model = parallel.wrap(module, ranks, cfg.parallel, compute_dtype, cfg.offload)
    return Policy(model, parallel.unwrap(model), tokenizer, ref_model, compute_dtype, ranks, bool(cfg.lora_r), vllm)


def restore(run: Run, state: dict) -> None:
    """Continue exactly where the checkpoint left off: optimizer (and a sharded checkpoint's weights),
    schedule, data order, RNGs (each rank its own when the number of processes is the same), counters."""
    ranks, shards = run.policy.ranks, sharded_dir(state["checkpoint_dir"])
    if shards:  # every rank reads its part of the weights and AdamW state, saved on any number of ranks
        parallel.load_sharded_state(run.policy.model, run.optimizer, shards)
    else:
        parallel.load_optimizer_state(run.policy.model, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.batches.load_state_dict(state["batches"])
    same_ranks = len(state.get("rank_rngs") or []) == ranks.world
    rng, generator = state["rank_rngs"][ranks.rank] if same_ranks else (state["rng"], state["generator"])
    set_rng_state(rng)
    set_generator_state(run.generator, generator)
    run.step, run.skipped_steps = state["step"], state.get("skipped_steps", 0)
    run.eval_before = state.get("eval_before", {})
    run.best = resumed_best(run, state.get("best") or {})


def resumed_best(run: Run, saved: dict) -> dict:
    """The best so far on --resume: the checkpoint's record of it, or checkpoint-best's own record when that
    folder was written after the checkpoint resumed from (the record says what the folder holds)."""
    best_dir = os.path.join(run.out_dir, "checkpoint-best")
    if os.path.exists(os.path.join(best_dir, STATE_FILE)):
        try:
            on_disk = load_trainer_state(best_dir).get("best") or {}
        except Exception as e:  # an unreadable checkpoint-best is replaced by the next better eval
            on_disk = {}
            if run.policy.ranks.is_main:
                print(f"warning: {best_dir}: its trainer state does not load ({type(e).__name__}); "
                      f"the next better evaluation replaces it")
        if on_disk.get("step", -1) > saved.get("step", -1):
            saved = on_disk
    return saved if saved.get("metric") == run.cfg.metric_for_best else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_banner(run: Run) -> None:
    cfg, ranks = run.cfg, run.policy.ranks
    if not ranks.is_main:
        return
    from tqdm.auto import tqdm
    tqdm.get_lock()  # tqdm's lazy imports, now: a SIGTERM landing inside an import breaks CPython 3.11's import lock
    n_trainable, n_params = lora.trainable_fraction(run.policy.module)
    lora_note = f", LoRA r={cfg.lora_r}: {n_trainable / 1e6:.3f}M trainable" if cfg.lora_r else ""
    scale_note = (f" · {ranks.world} processes ({cfg.parallel}{', offload' if cfg.offload else ''})"
                  if ranks.distributed else "")
    print(f"GRACE {run.mode} · model {cfg.model} ({n_params / 1e6:.2f}M params{lora_note}) · {run.n_train} "
          f"train / {len(run.heldout)} held-out examples · {run.total_steps} steps × {cfg.batch_size} prompts × "
          f"G={cfg.group_size} · reward {cfg.reward} · {ranks.device}{scale_note} → {run.out_dir}")


# ---------------------------------------------------------------------------------------------
# The loop


class StopOnSignal:
    """Ctrl-C / SIGTERM: finish the current step, save, exit cleanly. A second Ctrl-C stops at once."""

    def __init__(self, announce: bool):
        self.requested, self.announce = False, announce

    def __enter__(self):
        self.old = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            from tqdm.auto import tqdm
            tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, saving, then stopping "
                       f"(press Ctrl-C again to abort now)")

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def train_loop(run: Run, reward_fn, stop: StopOnSignal) -> tuple[float, list[float]]:
    """Steps until the end, a stop request or too many bad steps → (training seconds, mean reward per step)."""
    from tqdm.auto import tqdm

    cfg, ranks = run.cfg, run.policy.ranks
    reward_means, bad_in_a_row, started, first_step = [], 0, time.perf_counter(), run.step
    bar = tqdm(range(run.step, run.total_steps), desc="GRACE", initial=run.step, total=run.total_steps,
               disable=not ranks.is_main)
    for step in bar:
        result = grace_step(run.policy, run.optimizer, run.scheduler, next(run.batches), cfg, run.mode,
                            run.generator, reward_fn)
        run.step = step + 1
        if result.skipped:  # non-finite rewards, loss or gradients: no (or a partial) update
            run.skipped_steps, bad_in_a_row = run.skipped_steps + 1, bad_in_a_row + 1
            if ranks.is_main:
                tqdm.write(f"step {run.step}: skipped: {result.skipped}")
        else:
            bad_in_a_row = 0
        row = {"step": run.step, "epoch": run.batches.epoch, **step_metrics(result, run.scheduler.get_last_lr()[0]),
               "skipped_steps": run.skipped_steps}
        if bad_in_a_row >= cfg.max_bad_steps:
            stop_bad_steps(run, row, bad_in_a_row)
        if result.rewards is not None:
            reward_means.append(row["reward_mean"])
            log_step(run, row, result, bar, first=step == first_step)
        elif run.log:  # a skipped step: its row says why; checkpoints and Ctrl-C still apply below
            run.log.metric(row)
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total_steps:
            save_step_checkpoint(run)
        if ranks.max(int(stop.requested)):  # all ranks stop at the same step
            stop.requested = True
            break
    bar.close()
    return time.perf_counter() - started, reward_means


def log_step(run: Run, row: dict, result: StepResult, bar, first: bool) -> None:
    """Scheduled evaluation, the metrics row, a few samples now and then, the progress bar."""
    cfg, step = run.cfg, run.step
    if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps:
        row.update(evaluate_run(run)[0])
        if is_better(run, row):
            keep_best(run, row)
    if run.log is None:
        return
    if step % cfg.log_every == 0 or step == run.total_steps:
        run.log.metric(row)
    if step % (10 * cfg.log_every) == 0 or first:
        run.log.sample(step, result, cfg.group_size)
    bar.set_postfix(reward=f"{row['reward_mean']:.2f}", pos=f"{row.get('reward_positive', float('nan')):.3f}",
                    cross=f"{row['emb_cross_cos_mean']:.3f}", len=f"{row['response_len_mean']:.1f}")


def stop_bad_steps(run: Run, row: dict, bad_in_a_row: int) -> None:
    path = save_step_checkpoint(run)
    if run.log:
        run.log.metric(row)
        run.log.close()
    raise TrainingStopped(
        f"{bad_in_a_row} consecutive steps had non-finite values (last: {row['skipped']}); their "
        f"updates were skipped, so {path} holds the last good weights. Likely causes: a learning rate "
        f"too high (--lr {run.cfg.lr}), fp16 overflow (--dtype), or a reward function that returns NaN")


# ---------------------------------------------------------------------------------------------
# Checkpoints, evaluation, the end of a run


def checkpoint(run: Run, name: str, final: bool = False) -> str:
    """Everything needed to continue exactly, on any number of processes (every rank calls it).

    Step checkpoints of an FSDP model are sharded: each rank writes its own part of the weights and
    AdamW state (parallel.save_sharded_checkpoint). Otherwise, and for checkpoint-final (a plain
    transformers model, without the optimizer), every rank gathers the full weights (a collective
    under FSDP) and rank 0 writes them. The other ranks wait for rank 0 on a gloo group
    (parallel.wait_for_main), not in an NCCL collective the watchdog would time out."""
    policy, ranks, path = run.policy, run.policy.ranks, os.path.join(run.out_dir, name)
    state = {"scheduler": run.scheduler.state_dict(), "batches": run.batches.state_dict(), "rng": rng_state(),
             "generator": run.generator.get_state(), "step": run.step, "skipped_steps": run.skipped_steps,
             "config": run.cfg.to_dict(), "eval_before": run.eval_before, "best": run.best,
             "rank_rngs": parallel.gather_to_main(ranks, (rng_state(), run.generator.get_state()))}
    if parallel.is_fsdp(policy.model) and not final:
        failed = parallel.save_sharded_checkpoint(path, policy.model, run.optimizer, policy.tokenizer, state, ranks)
    else:
        weights, state["optimizer"] = parallel.full_state_dicts(policy.model, None if final else run.optimizer)
        failed = None
        if ranks.is_main:
            try:
                save_checkpoint(path, policy.module, policy.tokenizer, state, state_dict=weights,
                                merge_adapter=lora.save_merged if final and policy.lora else None)
            except CheckpointError as e:  # e.g. DiskFullError: every rank stops, not only rank 0 (issue #16)
                failed = e
    failed = parallel.wait_for_main(ranks, failed)
    if failed is not None:
        raise failed
    return path


def save_step_checkpoint(run: Run) -> str:
    path, failed = checkpoint(run, f"checkpoint-{run.step:06d}"), None
    if run.policy.ranks.is_main:
        try:  # verifies (re-reads) the new checkpoint before deleting older ones
            prune_checkpoints(run.out_dir, run.cfg.keep_last)
        except CheckpointError as e:
            failed = e
    failed = parallel.wait_for_main(run.policy.ranks, failed)  # (the other ranks wait on gloo meanwhile)
    if failed is not None:
        raise failed
    return path


def is_better(run: Run, metrics: dict) -> bool:
    """Whether this evaluation (after training began) beats checkpoint-best on --metric-for-best; every rank
    gets rank 0's answer (they all evaluate, and all take part in writing the checkpoint)."""
    name = run.cfg.metric_for_best
    value = metrics.get(name, float("nan")) if name else float("nan")
    better = math.isfinite(value) and (not run.best or value > run.best["value"])
    return bool(parallel.wait_for_main(run.policy.ranks, better))


def keep_best(run: Run, metrics: dict, final: str = "") -> str:
    """checkpoint-best ← the model now (every rank calls it): the same kind of folder as checkpoint-final, and
    with `final` (the checkpoint-final just written of this same model) hard links to its files."""
    run.best = {"metric": run.cfg.metric_for_best, "step": run.step, "value": metrics[run.cfg.metric_for_best]}
    path = os.path.join(run.out_dir, "checkpoint-best")
    if not final:
        return checkpoint(run, "checkpoint-best", final=True)
    failed = None
    if run.policy.ranks.is_main:
        try:
            link_checkpoint(final, path)
        except CheckpointError as e:
            failed = e
    failed = parallel.wait_for_main(run.policy.ranks, failed)
    if failed is not None:
        raise failed
    return path


def evaluate(policy: Policy, heldout: list[Example], cfg: GraceConfig, corpus, tasks=()) -> tuple[dict, list[dict]]:
    """Held-out retrieval with greedy rationales, and the mteb `tasks` (--eval-tasks) through the
    Encoder → ({eval_*: value}, a few example rationales).

    Every rank evaluates (the same numbers): under FSDP the forwards need all ranks' weights."""
    from .encode import Encoder

    out, examples = {}, []
    if heldout:
        with policy.autocast(), parallel.full_weights(policy.model):
            metrics, doc_rationales, _ = heldout_retrieval(
                policy.module, policy.tokenizer, heldout, max_new_tokens=cfg.max_new_tokens,
                max_prompt_len=cfg.max_prompt_len, batch_size=min(64, cfg.rollout_rows or 64))  # KV cache bound
        out = {f"eval_{k}": v for k, v in metrics.items()}
        if corpus is not None:  # built-in data knows each text's topic: how often does the rationale name it?
            rows = corpus.heldout[:len(heldout)]
            named = [rationale_topic(r, corpus) == row["topic"] for r, row in zip(doc_rationales, rows)]
            out["eval_rationale_topic_acc"] = sum(named) / len(named)
        examples = [{"text": ex.text, "rationale": r} for ex, r in zip(heldout[:3], doc_rationales[:3])]
    if tasks:
        encoder = Encoder((policy.module, policy.tokenizer), max_new_tokens=cfg.max_new_tokens,
                          max_prompt_len=cfg.max_prompt_len, max_tokens_per_microbatch=cfg.max_tokens_per_microbatch)
        with policy.autocast(), parallel.full_weights(policy.model):
            scores, failed = run_tasks(MtebEncoder(encoder, name=cfg.model), tasks, None, progress=False)
        for why in failed.values():
            if policy.ranks.is_main:
                print(f"warning: {why}")
        out.update({f"eval_mteb_{task}": score for task, score in scores.items()})
    return out, examples


def evaluate_run(run: Run) -> tuple[dict, list[dict]]:
    return evaluate(run.policy, run.heldout, run.cfg, run.corpus, run.tasks)


def stop_early(run: Run) -> dict:
    """A stop request (Ctrl-C / SIGTERM) ended the loop: save, say how to continue."""
    path = save_step_checkpoint(run)
    if run.log:
        print(f"stopped at step {run.step}/{run.total_steps}; saved {path}. "
              f"Continue with: python train.py --resume {run.out_dir}")
        run.log.close()
    return {"stopped_at": run.step, "checkpoint": path}


def finish(run: Run, train_seconds: float, reward_means: list[float]) -> dict:
    """Final evaluation, the final checkpoint, summary.json and the printed summary."""
    after, examples_after = evaluate_run(run)
    final_is_best = is_better(run, after)
    if final_is_best:  # (the record first: checkpoint-final's trainer state holds it too)
        run.best = {"metric": run.cfg.metric_for_best, "step": run.step, "value": after[run.cfg.metric_for_best]}
    final = checkpoint(run, "checkpoint-final", final=True)
    if final_is_best:
        keep_best(run, after, final=final)
    best_dir = os.path.join(run.out_dir, "checkpoint-best")
    summary = {"steps": run.step, "mode": run.mode, "skipped_steps": run.skipped_steps,
               "reward_first10": _mean(reward_means[:10]), "reward_last10": _mean(reward_means[-10:]),
               "train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
               "eval_before": run.eval_before, "eval_after": after, "checkpoint": final,
               "best": {**run.best, "checkpoint": best_dir if os.path.isdir(best_dir) else None} if run.best else None}
    if run.log:
        run.log.metric({"step": run.step, **after})
        run.log.close()
        write_json(os.path.join(run.out_dir, "summary.json"), summary)
        print_summary(summary, examples_after)
    return summary


class RunLog:
    """metrics.jsonl (one JSON object per row) and samples.jsonl, flushed every write; with --report-to
    tensorboard every metrics row goes to TensorBoard too. Closing it draws RUN/curves.png (plot.py)."""

    def __init__(self, out_dir: str, report_to: str = "none"):
        self.out_dir = out_dir
        self.tensorboard = TensorBoardLog(out_dir) if report_to == "tensorboard" else None
        self.metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self.samples = open(os.path.join(out_dir, "samples.jsonl"), "a")

    def metric(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tensorboard:
            self.tensorboard.log(row)

    def sample(self, step: int, result: StepResult, group_size: int, n: int = 2) -> None:
        """The first rationales of the first `n` prompts of this rank, with their rewards."""
        for p, ex in enumerate(result.examples[:n]):
            for g in range(min(2, group_size)):
                i = p * group_size + g
                self.samples.write(json.dumps({"step": step, "input": ex.text, "rationale": result.rationales[i],
                                               "reward": result.local_rewards[i]}) + "\n")
        self.samples.flush()

    def close(self):
        self.metrics.close()
        self.samples.close()
        if self.tensorboard:
            self.tensorboard.close()
        write_run_plot(self.out_dir)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def print_summary(summary: dict, examples: list[dict]) -> None:
    print(f"\nGRACE {summary['mode']}: {summary['steps']} steps")
    print(f"  {'mean reward':<28}{summary['reward_first10']:>10.3f} → {summary['reward_last10']:.3f}"
          f"   (first 10 steps → last 10)")
    before, after = summary["eval_before"], summary["eval_after"]
    for key in after:
        print(f"  {'held-out ' + key[5:]:<28}{before.get(key, float('nan')):>10.3f} → {after[key]:.3f}")
    for ex in examples[:2]:
        print(f"  e.g. {ex['text'][:70]!r}\n       → {ex['rationale'][:90]!r}")
    print(f"  checkpoint: {summary['checkpoint']}")
    best, name = summary.get("best"), (summary.get("best") or {}).get("metric")
    if best and name in before and name in after:
        print("  " + best_line(name, before[name], after[name], summary["steps"], best["step"], best["value"]))


def best_line(metric: str, untrained: float, final: float, final_step: int, best_step: int, best_value: float) -> str:
    """The end-of-run verdict on --metric-for-best, one line: did training make the held-out metric worse than
    the untrained model, is the final checkpoint the best one, and if not which step checkpoint-best is."""
    change = f"held-out {metric.removeprefix('eval_')} {untrained:.3f} → {final:.3f}"
    best = f"checkpoint-best is step {best_step} ({best_value:.3f})"
    if final < untrained and best_value < untrained:
        return f"{change}: the model got worse than untrained; {best}, also worse than untrained"
    if final < untrained:
        return f"{change}: the model got worse than untrained; {best}"
    if final < best_value:
        return f"{change}: the final checkpoint is not the best; {best}"
    if best_step != final_step:
        return f"{change}: the final checkpoint ties the best; {best}, the earlier one"
    return f"{change}: the final checkpoint is the best (checkpoint-best is the final step, {final_step})"
