"""Metrics: the numbers a run logs, computed from what a step returns, and held-out retrieval scores.

One row of metrics.jsonl per step (`step_metrics`): reward and each reward component, advantages,
clip fraction and KL, response lengths and truncation, and `emb_cross_cos_mean`, the collapse
signal (the mean cosine between rationales of *different* texts: it goes to 1 when every embedding
agrees, which a reward that only pulls things together would happily do).
"""
from __future__ import annotations

import torch


def step_metrics(result, lr: float) -> dict:
    """A step's metrics row from its StepResult (see step.py); a skipped step reports why and its time."""
    if result.rewards is None:
        return {"skipped": result.skipped, "step_time_s": result.step_time_s}
    rewards, update, lengths = result.rewards, result.update, result.response_lengths.float()  # [P*G]
    row = {
        "reward_mean": float(rewards.total.mean()),
        "reward_std": float(rewards.total.std()),
        **{f"reward_{name}": float(v.mean()) for name, v in rewards.parts.items()},
        "advantage_abs_mean": float(result.advantages.abs().mean()),
        "frac_zero_std_groups": result.frac_zero_std,
        "clip_frac": update.clip_frac_sum / max(update.tokens, 1),
        "dual_clip_frac": update.dual_clip_frac_sum / max(update.tokens, 1),
        "first_update_ratio_dev": update.first_update_ratio_dev,
        "kl": update.kl_sum / max(update.tokens, 1),
        "loss": update.loss / update.n_updates,
        "grad_norm": update.grad_norm / update.n_updates,
        "skipped_updates": update.skipped_updates,
        "response_len_mean": float(lengths.mean()),
        "truncated_frac": float(result.truncated.float().mean()),
        "prompt_truncated_frac": result.prompt_truncated_frac,
        "emb_cross_cos_mean": cross_text_cosine(result.doc_emb, result.group_size),
        "lr": lr,
        "tokens_per_s": result.response_tokens / result.step_time_s,
        "rollout_time_s": result.rollout_time_s,
        "step_time_s": result.step_time_s,
    }
    if result.skipped:
        row["skipped"] = result.skipped
    return row


def cross_text_cosine(doc_emb: torch.Tensor, group_size: int) -> float:
    """Mean cosine between rollouts of *different* texts: the collapse signal (→ 1 when all embeddings agree)."""
    emb = torch.nn.functional.normalize(doc_emb.float(), dim=-1)
    group_sums = emb.view(-1, group_size, emb.shape[-1]).sum(1)  # [P, H]
    all_pairs = emb.sum(0).square().sum()  # Σ_{i,j} cos(d_i, d_j)
    same_group = group_sums.square().sum(-1).sum()  # Σ over pairs within a group (incl. i = j)
    n, n_groups = emb.shape[0], group_sums.shape[0]
    cross_pairs = n * n - n_groups * group_size * group_size
    return float((all_pairs - same_group) / max(cross_pairs, 1))


def retrieval_metrics(query_emb: torch.Tensor, doc_emb: torch.Tensor, relevant: torch.Tensor, k: int = 10) -> dict:
    """query_emb [Q, H], doc_emb [D, H] (unit norm), relevant [Q] (index of each query's one relevant doc)."""
    scores = query_emb @ doc_emb.T  # [Q, D]
    # Rank of the relevant doc = number of docs scoring strictly higher (ties count in its favour).
    rank = (scores > scores.gather(1, relevant[:, None])).sum(1)  # [Q], 0-based
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank, dtype=torch.float))
    mrr = torch.where(hit, 1.0 / (rank.float() + 1.0), torch.zeros_like(rank, dtype=torch.float))
    return {"recall@1": float((rank == 0).float().mean()), f"mrr@{k}": float(mrr.mean()),
            f"ndcg@{k}": float(ndcg.mean())}
