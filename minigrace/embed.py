"""Embed: one no-grad forward over the rollouts → embeddings for the reward and old log-probs for the loss.

The embedding of a rollout is the L2-normalized mean of the last-layer hidden states over its
pool_mask (user text + assistant header + rationale + EOS, the system prompt excluded). The same
forward's hidden states give the log-probs of the response tokens under the sampling policy, which
the clipped ratio needs later: one forward pass, two results.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import masked_mean_pool
from .loss import policy_forward, response_logprobs
from .rollout import Rollouts


@dataclass
class Forward:
    embeddings: torch.Tensor  # [N, H] fp32, unit norm
    old_logprobs: torch.Tensor  # [N, L] fp32, 0 outside response_mask


def microbatches(lengths: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Split rows into consecutive index groups whose padded size (rows × longest row) fits max_tokens."""
    groups, current, longest = [], [], 0
    for row, length in enumerate(lengths.tolist()):
        longest_if_added = max(longest, length)
        if current and longest_if_added * (len(current) + 1) > max_tokens:
            groups.append(torch.tensor(current))
            current, longest_if_added = [], length
        current.append(row)
        longest = longest_if_added
    if current:
        groups.append(torch.tensor(current))
    return groups


def trim(rollouts: Rollouts) -> tuple[Rollouts, slice]:
    """Drop columns that are padding in every row (a micro-batch of short rows needs fewer).

    Returns the trimmed rollouts and the column slice, to cut other [n, L] tensors the same way."""
    real = rollouts.attention.bool().any(0).nonzero()
    cols = slice(int(real.min()), int(real.max()) + 1)
    cut = Rollouts(rollouts.ids[:, cols], rollouts.attention[:, cols], rollouts.response_mask[:, cols],
                   rollouts.pool_mask[:, cols], rollouts.truncated, rollouts.prompt_truncated,
                   rollouts.prompt_width - cols.start)
    return cut, cols


@torch.no_grad()
def forward_rollouts(model, rollouts: Rollouts, max_tokens_per_microbatch: int, logprob_chunk: int,
                     with_logprobs: bool = True) -> Forward:
    """Embeddings [N, H] and old log-probs [N, L] of all rollouts, micro-batched by token budget."""
    n, width = rollouts.ids.shape
    embeddings = torch.empty(n, model.config.hidden_size, dtype=torch.float32, device=rollouts.ids.device)
    old_logprobs = torch.zeros(n, width, dtype=torch.float32, device=rollouts.ids.device)
    lm_head = model.get_output_embeddings().weight
    for rows in microbatches(rollouts.attention.sum(-1), max_tokens_per_microbatch):
        rows = rows.to(rollouts.ids.device)
        part, cols = trim(rollouts.rows(rows))
        hidden = policy_forward(model, part.ids, part.attention)  # [n, L', H]
        embeddings[rows] = masked_mean_pool(hidden, part.pool_mask, normalize=True).float()
        if with_logprobs:
            old_logprobs[rows, cols] = response_logprobs(hidden, lm_head, part.ids, part.response_mask, logprob_chunk)
    return Forward(embeddings, old_logprobs)
