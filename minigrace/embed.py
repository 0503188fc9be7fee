"""Embed: the one pooled forward. Rollouts in → embeddings (and the sampling policy's log-probs) out.

The embedding of a rollout is the L2-normalized mean of the last-layer hidden states over its
pool_mask (user text + assistant header + rationale + EOS, the system prompt excluded). In a GRPO
step the same no-grad forward also gives the log-probs of the response tokens under the sampling
policy, which the clipped ratio needs later: one forward pass, two results (`forward_rollouts`).
Every row starts with the same system prompt, whose states do not depend on the row: that prefix is run
once, on one row, and the rows continue from a copy of its KV cache (`shared_prefix`); the numbers are
those of the full forward up to floating-point noise.

At inference there are no log-probs to compute, so the Encoder (encode.embed_prompts) skips this forward:
rollout.generate_pooled collects the same last-layer states while it writes the rationale. Same span,
same mean, same normalization: the two agree to fp32 noise (tests/test_embed.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import masked_mean_pool_span
from .loss import response_logprobs
from .rollout import KVDecoder, Rollouts, position_ids


def policy_forward(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) [n, L, H]; no logits are computed.

    Goes through the model's own forward (not its inner decoder), so DDP / FSDP / peft wrappers see
    the call: an empty `logits_to_keep` makes the lm_head project zero positions."""
    out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention), use_cache=False,
                output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    return out.hidden_states[-1]


def prefixed_forward(model, prefix: torch.Tensor, part: Rollouts, positions: torch.Tensor,
                     prefix_model=None) -> torch.Tensor:
    """policy_forward of rows that all start with `prefix` [S], whose own tokens (part.attention, prefix
    excluded: see without_prefix) sit at `positions` [n, L']: the prefix runs once, on one row (through
    prefix_model when given), and every row continues from a copy of its KV cache. → hidden [n, L', H].
    Differentiable: with grad on, the prefix's weights get the gradient of every row."""
    if not len(prefix):
        return policy_forward(model, part.ids, part.attention)
    decoder = KVDecoder(model, hidden=True)
    decoder.prefill_prefix(prefix, len(part.ids), model=prefix_model)
    return decoder.feed(part.ids, part.attention, positions, logits=False)[1]


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


def shared_prefix(rollouts: Rollouts) -> torch.Tensor:
    """The tokens every row starts with before its pooled span [S] (the system prompt; empty when rows differ).
    Rows are left-padded, so each row's prefix starts at its own first real column."""
    first = rollouts.attention.argmax(-1)  # [N] first real column
    before_pool = int((pool_span(rollouts)[0] - first).min())  # tokens ahead of the earliest pooled one
    columns = (first[:, None] + torch.arange(before_pool, device=first.device)).clamp(max=rollouts.ids.shape[1] - 1)
    heads = rollouts.ids.gather(1, columns)  # [N, before_pool]
    same = (heads == heads[:1]).all(0).long().cumprod(0)  # 1 while every row agrees
    return heads[0, :int(same.sum())]


def split_prefix(rollouts: Rollouts, share: bool) -> tuple[torch.Tensor, torch.Tensor, Rollouts]:
    """(the rows' shared prefix [S], empty unless `share`; every token's position [N, L], prefix included;
    the rollouts without it) → what prefixed_forward takes, micro-batch by micro-batch."""
    prefix = shared_prefix(rollouts) if share else rollouts.ids[0, :0]
    return prefix, position_ids(rollouts.attention), without_prefix(rollouts, len(prefix))


def without_prefix(rollouts: Rollouts, prefix_len: int) -> Rollouts:
    """The rollouts with each row's first prefix_len real tokens marked as padding (attention 0)."""
    first = rollouts.attention.argmax(-1, keepdim=True)  # [N, 1]
    columns = torch.arange(rollouts.ids.shape[1], device=first.device)
    in_prefix = (columns >= first) & (columns < first + prefix_len)
    return Rollouts(rollouts.ids, rollouts.attention * ~in_prefix, rollouts.response_mask, rollouts.pool_mask,
                    rollouts.truncated, rollouts.prompt_truncated, rollouts.prompt_width)


@dataclass
class Forward:
    embeddings: torch.Tensor  # [N, H] fp32 (unit norm unless normalize=False)
    old_logprobs: torch.Tensor | None  # [N, L] fp32, 0 outside response_mask; None when not asked for


@torch.no_grad()
def forward_rollouts(model, rollouts: Rollouts, max_tokens_per_microbatch: int, logprob_chunk: int = 1024,
                     with_logprobs: bool = True, normalize: bool = True, share_prefix: bool = True) -> Forward:
    """Embeddings [N, H] (and old log-probs [N, L]) of all rollouts, micro-batched by token budget.
    share_prefix: run the rows' common system prompt once per micro-batch (see shared_prefix)."""
    n, width = rollouts.ids.shape
    device = rollouts.ids.device
    embeddings = torch.empty(n, model.config.hidden_size, dtype=torch.float32, device=device)
    old_logprobs = torch.zeros(n, width, dtype=torch.float32, device=device) if with_logprobs else None
    prefix, positions, rest = split_prefix(rollouts, share_prefix)  # [S], [N, L], rows after the prefix
    for rows in microbatches(rest.attention.sum(-1), max_tokens_per_microbatch):
        rows = rows.to(device)
        part, cols = trim(rest.rows(rows))
        hidden = prefixed_forward(model, prefix, part, positions[rows, cols])  # [n, L', H]
        start, end = pool_span(part)
        embeddings[rows] = masked_mean_pool_span(hidden, start, end, normalize=normalize)  # [n, H] fp32
        if with_logprobs:
            lm_head = model.get_output_embeddings().weight
            old_logprobs[rows, cols] = response_logprobs(hidden, lm_head, part.ids, part.response_mask, logprob_chunk)
    return Forward(embeddings, old_logprobs)
