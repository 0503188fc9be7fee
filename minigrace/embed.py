"""Embed: the one pooled forward. Rollouts in → embeddings (and the sampling policy's log-probs) out.

The embedding of a rollout is the L2-normalized mean of the last-layer hidden states over its
pool_mask (user text + assistant header + rationale + EOS, the system prompt excluded). In a GRPO
step the same no-grad forward also gives the log-probs of the response tokens under the sampling
policy, which the clipped ratio needs later: one forward pass, two results (`forward_rollouts`).

At inference there are no log-probs to compute, so the Encoder (encode.embed_prompts) skips this forward:
rollout.generate_pooled collects the same last-layer states while it writes the rationale. Same span,
same mean, same normalization: the two agree to fp32 noise (tests/test_embed.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import masked_mean_pool_span
from .loss import response_logprobs
from .rollout import Rollouts, position_ids


def policy_forward(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) [n, L, H]; no logits are computed.

    Goes through the model's own forward (not its inner decoder), so DDP / FSDP / peft wrappers see
    the call: an empty `logits_to_keep` makes the lm_head project zero positions."""
    out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention), use_cache=False,
                output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    return out.hidden_states[-1]


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


def pool_span(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's pooled columns as a span [start, end) → ([n], [n]): start = the first pooled column, end = the
    last attended column + 1. pool_mask is exactly that span: a row's real tokens are contiguous (left-padded
    prompt, then the response up to its EOS) and pooling runs from pool_start to the row's last token."""
    columns = torch.arange(rollouts.ids.shape[1], device=rollouts.ids.device)
    start = torch.where(rollouts.pool_mask, columns, rollouts.ids.shape[1]).amin(-1)
    end = ((columns + 1) * rollouts.attention).amax(-1)
    return start, end


@dataclass
class Forward:
    embeddings: torch.Tensor  # [N, H] fp32 (unit norm unless normalize=False)
    old_logprobs: torch.Tensor | None  # [N, L] fp32, 0 outside response_mask; None when not asked for


@torch.no_grad()
def forward_rollouts(model, rollouts: Rollouts, max_tokens_per_microbatch: int, logprob_chunk: int = 1024,
                     with_logprobs: bool = True, normalize: bool = True) -> Forward:
    """Embeddings [N, H] (and old log-probs [N, L]) of all rollouts, micro-batched by token budget."""
    n, width = rollouts.ids.shape
    device = rollouts.ids.device
    embeddings = torch.empty(n, model.config.hidden_size, dtype=torch.float32, device=device)
    old_logprobs = torch.zeros(n, width, dtype=torch.float32, device=device) if with_logprobs else None
    for rows in microbatches(rollouts.attention.sum(-1), max_tokens_per_microbatch):
        rows = rows.to(device)
        part, cols = trim(rollouts.rows(rows))
        hidden = policy_forward(model, part.ids, part.attention)  # [n, L', H]
        start, end = pool_span(part)
        embeddings[rows] = masked_mean_pool_span(hidden, start, end, normalize=normalize)  # [n, H] fp32
        if with_logprobs:
            lm_head = model.get_output_embeddings().weight
            old_logprobs[rows, cols] = response_logprobs(hidden, lm_head, part.ids, part.response_mask, logprob_chunk)
    return Forward(embeddings, old_logprobs)
