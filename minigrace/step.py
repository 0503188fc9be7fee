"""Step: one GRACE step, top to bottom.

    rollout    G rationales per text (temperature 1.0), one per query / negative (0.5)   rollout.py
    embed      one no-grad forward → embeddings [N, H] + old log-probs [N, L]           embed.py
    reward     contrastive reward of each main rollout from embeddings alone            reward.py
    advantage  reward − group mean                                                      advantage.py
    update     clipped policy gradient on the main rollouts, AdamW                      loss.py

Only the main rationales (the positive document's, or the text's in unsupervised mode) are
trained; query and negative rationales come from the same policy but get no gradient.

Shapes: P prompts in the global batch, G rollouts per prompt, N rollout rows on this rank, L tokens,
H hidden size. Under torchrun each rank rolls out and trains on its share of the prompts; `ranks`
(parallel.Ranks) gathers what the reward needs from every rank, and is the identity on one process.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from . import parallel
from .advantage import compute_advantages
from .config import GraceConfig
from .data import Example
from .embed import forward_rollouts, microbatches, prefixed_forward, split_prefix, trim
from .loss import policy_loss, response_logprobs
from .prompts import chat_prompt
from .reward import Rewards, compute_rewards, nonfinite_rewards, reward_weights
from .rollout import Rollouts, cat_rollouts, eos_token_ids, generate


@dataclass
class Policy:
    model: torch.nn.Module  # what trains: the HF (or peft) model, wrapped in DDP / sharded by FSDP under torchrun
    module: torch.nn.Module  # the HF (or peft) model itself: generation, no-grad forwards, saving
    tokenizer: object
    ref_model: torch.nn.Module | None  # frozen copy, only when kl_coef > 0 without LoRA
    autocast_dtype: torch.dtype | None  # bf16 under --dtype bf16 (the default on CUDA, GPU or CPU); None: fp32
    ranks: parallel.Ranks
    lora: bool = False  # adapters on a frozen base: the base (adapters off) is the KL reference
    vllm: object | None = None  # VLLMRollout for --rollout vllm

    @classmethod
    def single_process(cls, model, tokenizer) -> "Policy":
        """One process, no autocast, no KL reference: to drive grace_step / evaluate from a script."""
        return cls(model, model, tokenizer, None, None, parallel.Ranks(0, 1, model.device, launched=False))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ranks.device.type, dtype=self.autocast_dtype)


@dataclass
class UpdateStats:  # sums over every rank's micro-batches
    loss: float
    clip_frac_sum: float  # tokens where the clip was active
    kl_sum: float
    grad_norm: float  # summed over the updates that were applied
    n_updates: int
    skipped_updates: int  # non-finite loss or gradients: dropped, never applied
    tokens: float = 0.0  # response tokens the updates saw (every rank, every PPO epoch)
    dual_clip_frac_sum: float = 0.0  # tokens held at dual_clip·|A| (A < 0, ratio far above 1)
    # max |ratio − 1| over the first mini-batch, before the step's first optimizer step: the sampling policy's
    # log-probs against the update's own. 0 up to float noise when both use the same forward (shares_prefix).
    first_update_ratio_dev: float = 0.0


@dataclass
class StepResult:
    """Everything a step produced, for metrics.py, samples.jsonl and the harness. Global = every rank's rows."""
    step_time_s: float
    group_size: int
    skipped: str = ""  # why no update was made ('' when one was)
    rewards: Rewards | None = None  # global [P*G]
    advantages: torch.Tensor | None = None  # global [P*G]
    frac_zero_std: float = 0.0
    doc_emb: torch.Tensor | None = None  # global [P*G, H]
    response_lengths: torch.Tensor | None = None  # global [P*G]
    truncated: torch.Tensor | None = None  # global [P*G] bool
    prompt_truncated_frac: float = 0.0
    response_tokens: float = 0.0  # every generated token of the step (all sides, all ranks)
    rollout_time_s: float = 0.0
    update: UpdateStats | None = None
    examples: list[Example] | None = None  # this rank's prompts
    rationales: list[str] | None = None  # this rank's main rationales [P/N*G]
    local_rewards: list[float] | None = None  # their rewards


def grace_step(policy: Policy, optimizer, scheduler, examples: list[Example], cfg: GraceConfig, mode: str,
               generator: torch.Generator, reward_fn=compute_rewards) -> StepResult:
    """Rollout → embed → reward → advantage → update, on the global batch `examples` (P prompts).

    A step whose rewards are not finite makes no update (StepResult.skipped says why): never a silent 0."""
    t0 = time.perf_counter()
    ranks, G = policy.ranks, cfg.group_size
    weights = reward_weights(cfg.reward, cfg.w_positive, cfg.w_negative, cfg.w_consistency, cfg.w_cross_group,
                             cfg.w_discriminative)
    use_negatives = rolls_out_negatives(examples, mode, weights)
    local = ranks.shard(examples)  # this rank's prompts (all of them on one process)
    n_main, n_aux = len(local) * G, len(local)

    # 1. Rollout: main prompts ×G, then one query and (maybe) one negative prompt per example.
    prompts, temperatures = build_rollout_prompts(policy.tokenizer, local, cfg, mode, use_negatives)
    noise = rollout_noise(generator, len(examples), cfg, use_negatives, ranks)  # [N, max_new_tokens]
    if policy.vllm is not None:
        policy.vllm.sync_weights(policy.module, policy.lora)
    policy.module.eval()
    with policy.autocast(), parallel.full_weights(policy.model):
        rollouts = sample_rollouts(policy, prompts, temperatures, noise, cfg)  # ids [N, L]
        # 2. Embed: one forward gives embeddings for the reward and the sampling policy's log-probs.
        fwd = forward_rollouts(policy.module, rollouts, cfg.max_tokens_per_microbatch, cfg.logprob_chunk,
                               share_prefix=shares_prefix(policy, cfg))
        main = rollouts.rows(slice(0, n_main))  # the rollouts that train
        ref_logprobs = reference_logprobs(policy, main, cfg)  # [n_main, L] or None
    rollout_time = time.perf_counter() - t0

    # 3. Reward each main rollout against the whole global batch.
    doc_emb = ranks.gather(fwd.embeddings[:n_main], G)  # [P*G, H]
    query_emb = ranks.gather(fwd.embeddings[n_main:n_main + n_aux], 1)  # [P, H]
    neg_emb = ranks.gather(fwd.embeddings[n_main + n_aux:], 1) if use_negatives else None  # [P, H]
    truncated = ranks.gather(main.truncated, G)  # [P*G]
    rewards = reward_fn(doc_emb, query_emb, neg_emb, truncated, G, weights, cfg.tau, mode,
                        cfg.length_penalty, cfg.length_penalty_mode)
    problem = nonfinite_rewards(rewards)  # the global rewards: every rank skips the same steps
    if problem:
        scheduler.step()  # the step still counts: the learning-rate schedule follows the step number
        return StepResult(time.perf_counter() - t0, G, skipped=problem)

    # 4. Advantage: each rollout against the other G−1 of its group.
    advantages, frac_zero_std = compute_advantages(rewards.total, G, cfg.scale_std)  # [P*G]

    # 5. Update: clipped policy gradient on this rank's main rollouts.
    update = update_policy(policy, optimizer, main, fwd.old_logprobs[:n_main], ref_logprobs,
                           ranks.local(advantages, G), cfg)
    scheduler.step()

    response_tokens, prompt_cut = ranks.sum([float(rollouts.response_mask.sum()),
                                             float(rollouts.prompt_truncated.float().mean())])
    skipped = (f"{update.skipped_updates} of {update.n_updates} updates had a non-finite loss or gradient"
               if update.skipped_updates else "")
    return StepResult(
        step_time_s=time.perf_counter() - t0, group_size=G, skipped=skipped, rewards=rewards, advantages=advantages,
        frac_zero_std=frac_zero_std, doc_emb=doc_emb, response_lengths=ranks.gather(main.response_lengths, G),
        truncated=truncated, prompt_truncated_frac=prompt_cut / ranks.world, response_tokens=response_tokens,
        rollout_time_s=rollout_time, update=update, examples=local,
        rationales=policy.tokenizer.batch_decode(main.responses(), skip_special_tokens=True),
        local_rewards=ranks.local(rewards.total, G).tolist())


# ---------------------------------------------------------------------------------------------
# 1. Rollout


def rolls_out_negatives(examples: list[Example], mode: str, weights) -> bool:
    """Hard negatives are rolled out only when the reward reads them (not under --reward contrastive)
    and every example of the global batch has one; otherwise the in-batch negatives do the pushing."""
    return mode == "supervised" and weights.negative != 0 and all(ex.negative for ex in examples)


def build_rollout_prompts(tokenizer, examples: list[Example], cfg: GraceConfig, mode: str, use_negatives: bool):
    """Main prompts ×G, then one query prompt per example, then one negative prompt per example.

    Unsupervised: the "query" is the text itself, sampled once at the lower temperature, so the
    positive pair is (a temperature-0.5 rationale, each temperature-1.0 rationale) of the same text."""
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
    mine = ranks.shard(noise)  # [P/N, sides, R]: this rank's prompts
    main, aux = mine[:, :cfg.group_size].reshape(-1, cfg.max_new_tokens), mine[:, cfg.group_size:]
    return torch.cat([main, *aux.unbind(1)])  # [P/N·G + P/N (+ P/N), R]


def sample_rollouts(policy: Policy, prompts, temperatures, noise, cfg: GraceConfig) -> Rollouts:
    """Rationales for `prompts` from the current policy: vLLM when enabled, else transformers."""
    module, tokenizer = policy.module, policy.tokenizer
    kw = dict(max_new_tokens=cfg.max_new_tokens, eos_ids=eos_token_ids(module, tokenizer),
              pad_id=tokenizer.pad_token_id, top_p=cfg.top_p)
    if policy.vllm is not None:
        return policy.vllm.generate(prompts, temperatures, noise, device=policy.ranks.device, **kw)
    kw["share_prefix"] = True  # the system prompt runs once, its KV cache is copied to every row
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
    # The forward the loss computes the policy's log-probs with: the KL is 0 while the two models agree
    # (another forward would differ from the loss's by float noise, which the KL would show).
    kw = dict(max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, logprob_chunk=cfg.logprob_chunk,
              share_prefix=shares_prefix(policy, cfg))
    if policy.lora:
        with policy.module.disable_adapter():
            return forward_rollouts(policy.module, rows, **kw).old_logprobs
    return forward_rollouts(policy.ref_model, rows, **kw).old_logprobs


def shares_prefix(policy: Policy, cfg: GraceConfig) -> bool:
    """Whether the step's forwards run the rows' system prompt once and continue every row from a copy of its
    KV cache (embed.prefixed_forward). The update cannot where a second forward before backward is not allowed:
    gradient checkpointing recomputes layers without a KV cache, and FSDP reshards a layer's weights after each
    forward, under the prefix's saved activations. The embedding pass (old log-probs) and the KL reference then
    take the full forward too: one kind of forward on every side keeps the first update's ratio at 1 (the two
    kinds differ by float noise: max |ratio − 1| 1.9e-6 on the fp32 CPU path with --grad-checkpointing)."""
    return not (cfg.grad_checkpointing or parallel.is_fsdp(policy.model))


# ---------------------------------------------------------------------------------------------
# 5. Update


def update_policy(policy: Policy, optimizer, main: Rollouts, old_logprobs: torch.Tensor,
                  ref_logprobs: torch.Tensor | None, advantages: torch.Tensor, cfg: GraceConfig) -> UpdateStats:
    """PPO-clip updates over the main rollouts: mini-batches of prompts (one optimizer step each),
    micro-batches by token budget (gradient accumulation). A non-finite gradient is never applied."""
    model, ranks = policy.model, policy.ranks
    model.train()
    rows_per_update = cfg.mini_batch_size // ranks.world * cfg.group_size
    # The system prompt runs once per micro-batch (embed.prefixed_forward) unless the model cannot (shares_prefix).
    prefix, positions, main = split_prefix(main, shares_prefix(policy, cfg))  # [S], [n_main, L], rows after it
    stats = UpdateStats(0.0, 0.0, 0.0, 0.0, 0, 0)
    sums = torch.zeros(4, device=main.ids.device)  # loss, clip, dual clip, KL: on the device until the end
    first_ratio_dev = torch.zeros((), device=main.ids.device)
    for _ in range(cfg.ppo_epochs):
        for start in range(0, main.ids.shape[0], rows_per_update):
            update_rows = torch.arange(start, start + rows_per_update, device=main.ids.device)
            normalizer = ranks.token_normalizer(int(main.response_mask[update_rows].sum()))
            micros, n_real = ranks.pad_passes(microbatches(main.attention[update_rows].sum(-1),
                                                           cfg.max_tokens_per_microbatch))
            for i, micro in enumerate(micros):
                rows = update_rows[micro.to(update_rows.device)]
                with ranks.gradient_sync(model, sync=i == len(micros) - 1), policy.autocast():
                    loss, s = micro_batch_loss(policy, main.rows(rows), prefix, positions[rows], old_logprobs[rows],
                                               advantages[rows], None if ref_logprobs is None else ref_logprobs[rows],
                                               normalizer, cfg)
                    (loss * float(i < n_real)).backward()  # padding passes contribute nothing
                if i < n_real:
                    sums += torch.stack([loss.detach().float(), s["clip_frac_sum"], s["dual_clip_frac_sum"],
                                         s.get("kl_sum", torch.zeros_like(s["clip_frac_sum"]))])
                    if stats.n_updates == 0:  # no optimizer step yet: new and old log-probs share weights
                        first_ratio_dev = torch.maximum(first_ratio_dev, s["ratio_dev_max"].float())
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            if torch.isfinite(grad_norm):  # (a non-finite loss gives a non-finite norm too)
                optimizer.step()
                stats.grad_norm += float(grad_norm)
            else:  # a non-finite gradient would poison the weights: drop this update, count it
                stats.skipped_updates += 1
            optimizer.zero_grad(set_to_none=True)
            stats.n_updates += 1
    tokens = float(main.response_mask.sum()) * cfg.ppo_epochs
    stats.loss, stats.clip_frac_sum, stats.dual_clip_frac_sum, stats.kl_sum, stats.tokens = ranks.sum(
        sums.tolist() + [tokens])
    stats.loss /= ranks.world
    stats.first_update_ratio_dev = ranks.max(float(first_ratio_dev))
    return stats


def micro_batch_loss(policy: Policy, rows: Rollouts, prefix: torch.Tensor, positions: torch.Tensor, old_logprobs,
                     advantages, ref_logprobs, normalizer: float, cfg: GraceConfig) -> tuple[torch.Tensor, dict]:
    """The clipped policy loss of one micro-batch (its padding columns trimmed): forward with grad. `rows` hold
    each row after the shared `prefix` [S] (without_prefix), `positions` [n, L] their position ids."""
    part, cols = trim(rows)
    # Under DDP the prefix runs through the unwrapped module: the wrapper takes one forward per backward.
    hidden = prefixed_forward(policy.model, prefix, part, positions[:, cols], prefix_model=policy.module)  # [n, L', H]
    lm_head = policy.module.get_output_embeddings().weight  # after the forward: gathered under FSDP
    logprobs = response_logprobs(hidden, lm_head, part.ids, part.response_mask, cfg.logprob_chunk)  # [n, L']
    return policy_loss(logprobs, old_logprobs[:, cols], advantages, part.response_mask, cfg.clip_eps, normalizer,
                       None if ref_logprobs is None else ref_logprobs[:, cols], cfg.kl_coef,
                       dual_clip=cfg.dual_clip, kl_clamp=cfg.kl_clamp)
