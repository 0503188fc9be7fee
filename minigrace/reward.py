"""Reward: score every main rollout from embeddings alone (no labels), GRACE's way.

Components per rollout i of group g (d = document/text rollout, q = query, n = hard negative; all
cosines of unit vectors; the kernel computes them in one pass, see minigrace/kernels/cosine_reward.py):

    positive        cos(q_i, d_i)                               pull the text towards its query
    negative        −cos(q_g, n_g)                              push the hard negative away (constant in a group)
    consistency     mean_{j≠i in g} cos(d_i, d_j)               agree with the group's other rationales
    cross_group     −mean_{g'≠g} max_j cos(q_i, d_j^{g'})       (supervised) / −mean cos(d_i, q_{g'}) (unsupervised)
    discriminative  log softmax_{g'} cos(d_i, q_{g'})/τ at g    in-batch InfoNCE: each rollout against all queries

    total = (w_pos·positive + w_neg·negative + w_cons·consistency + w_cross·cross_group)/τ + w_disc·discriminative

`--reward grace` is GRACE's exact formula (w_disc = 0). In its supervised form the negative and
cross-group terms are the same for every member of a group, so they vanish in the group-centered
advantage: what is left rewards cos(q, d_i) and agreement within the group, which every rollout can
raise at once by making all embeddings alike. On the tiny model it collapses (emb_cross_cos_mean
0.86 → 0.99, held-out retrieval down). The default `--reward contrastive` is the discriminative
term alone: it rises only when a rollout is closer to its own query than to the other queries of
the batch, and all-alike embeddings are its worst case (−log P). `custom` mixes all weights. A rationale cut at max_new_tokens without
EOS is penalized (see `apply_length_penalty`). A non-finite reward is reported (`nonfinite_rewards`) and the trainer skips the step: never a silent 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import RewardWeights, grace_reward


@dataclass
class Rewards:
    total: torch.Tensor  # [P*G] fp32, after the length penalty
    parts: dict[str, torch.Tensor]  # component name → [P*G] raw (unweighted) values


def reward_weights(kind: str, positive: float, negative: float, consistency: float, cross_group: float,
                   discriminative: float) -> RewardWeights:
    """The component weights of a reward kind (--reward): contrastive keeps only the in-batch term,
    grace only GRACE's four terms, custom all five."""
    if kind == "contrastive":
        return RewardWeights(positive=0.0, negative=0.0, consistency=0.0, cross_group=0.0,
                             discriminative=discriminative)
    return RewardWeights(positive=positive, negative=negative, consistency=consistency, cross_group=cross_group,
                         discriminative=discriminative if kind == "custom" else 0.0)


def compute_rewards(doc_emb: torch.Tensor, query_emb: torch.Tensor, neg_emb: torch.Tensor | None,
                    truncated: torch.Tensor, group_size: int, weights: RewardWeights, tau: float, mode: str,
                    length_penalty: float = -1.0, length_penalty_mode: str = "relative") -> Rewards:
    """doc_emb [P*G, H], query_emb [P, H], neg_emb [P, H] or None, truncated [P*G] → Rewards.

    mode: supervised (query/positive pairs) or unsupervised (the query is the text's own rationale)."""
    total, parts = grace_reward(doc_emb, query_emb, neg_emb, group_size, tau, weights, mode=mode)
    if neg_emb is None or mode == "unsupervised":  # no hard negatives: no negative term to report
        parts.pop("negative")
    return Rewards(apply_length_penalty(total, truncated, group_size, length_penalty, length_penalty_mode), parts)


def nonfinite_rewards(rewards: Rewards) -> str:
    """'' when every reward is finite, else which are not: the trainer skips such a step (never zeroes it)."""
    bad = ~torch.isfinite(rewards.total)
    if not bad.any():
        return ""
    names = [name for name, values in rewards.parts.items() if not torch.isfinite(values).all()]
    groups = sorted({int(i) for i in bad.nonzero().flatten()})
    return f"{int(bad.sum())} of {bad.numel()} rewards are not finite (rows {groups[:8]}, components {names})"


def apply_length_penalty(total: torch.Tensor, truncated: torch.Tensor, group_size: int, penalty: float,
                         mode: str) -> torch.Tensor:
    """Replace the reward of rationales cut without EOS.

    constant (GRACE): the reward becomes `penalty`. That is only a penalty while complete rationales
    score above it; with an in-batch term the totals are often negative, and then a constant −1
    *rewards* never stopping (we saw the tiny model learn exactly that in 7 steps).
    relative (default): the reward becomes the group's worst complete reward + `penalty`, so a
    truncated rationale always ranks below every complete one of its group.
    none: no penalty. With a budget of a few dozen tokens a real instruct model is cut almost every
    time (SmolLM2 at 24 tokens: 94%), whole groups tie at the penalty and nothing is learned; its
    first tokens are still a rationale, and the embedding reward alone ranks them.
    """
    if mode == "none":
        return total
    if mode == "constant":
        return torch.where(truncated, torch.full_like(total, penalty), total)
    groups, cut = total.view(-1, group_size), truncated.view(-1, group_size)  # [P, G]
    worst_complete = groups.masked_fill(cut, float("inf")).amin(-1, keepdim=True)  # [P, 1]
    floor = torch.where(torch.isinf(worst_complete), torch.full_like(worst_complete, penalty), worst_complete + penalty)
    return torch.where(cut, floor.expand_as(groups), groups).flatten()
