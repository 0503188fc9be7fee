"""Embed: the one pooled forward. Rollouts in → embeddings (and the sampling policy's log-probs) out.

The embedding of a rollout is the L2-normalized mean of the last-layer hidden states over its
pool_mask (user text + assistant header + rationale + EOS, the system prompt excluded). In a GRPO
step the same no-grad forward also gives the log-probs of the response tokens under the sampling
policy, which the clipped ratio needs later: one forward pass, two results. Training, held-out
evaluation and the Encoder all embed through `forward_rollouts`, so they pool by the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import masked_mean_pool
from .loss import response_logprobs
from .prompts import ChatPrompt
from .rollout import Rollouts, eos_token_ids, generate, position_ids, prompt_only_rollouts


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
        embeddings[rows] = masked_mean_pool(hidden, part.pool_mask, normalize=normalize).float()  # [n, H]
        if with_logprobs:
            lm_head = model.get_output_embeddings().weight
            old_logprobs[rows, cols] = response_logprobs(hidden, lm_head, part.ids, part.response_mask, logprob_chunk)
    return Forward(embeddings, old_logprobs)


@torch.no_grad()
def embed_prompts(model, tokenizer, prompts: list[ChatPrompt], *, max_new_tokens: int, batch_size: int = 64,
                  rationale: bool = True, temperature: float = 0.0, seed: int = 0, normalize: bool = True,
                  max_tokens_per_microbatch: int = 16384, progress: bool = False
                  ) -> tuple[torch.Tensor, list[list[int]]]:
    """GRACE at inference: write a rationale for each templated prompt, embed prompt + rationale.

    → (embeddings [n, H] fp32 on CPU; rationale token ids, EOS included). rationale=False pools the
    prompt alone. Prompts are batched longest first (less padding), results put back in input order."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    eos_ids, pad_id = eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
    embeddings = torch.empty(len(prompts), model.config.hidden_size, dtype=torch.float32)
    responses: list[list[int]] = [[] for _ in prompts]
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="encode", disable=not progress, leave=False):
            index = order[start:start + batch_size]
            batch = [prompts[i] for i in index]
            if rationale:
                temps = torch.full((len(batch),), float(temperature))
                rollouts = generate(model, batch, temps, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    pad_id=pad_id, generator=generator)
                for i, ids in zip(index, rollouts.responses()):
                    responses[i] = ids
            else:
                rollouts = prompt_only_rollouts(batch, pad_id, model.device)
            fwd = forward_rollouts(model, rollouts, max_tokens_per_microbatch, with_logprobs=False, normalize=normalize)
            embeddings[index] = fwd.embeddings.cpu()
    finally:
        model.train(was_training)
    return embeddings, responses
