"""Loss: response log-probs without [B, T, V] logits, and the clipped policy-gradient objective.

Log-probs are needed only where a response token is predicted. We gather those hidden states
([M, H], M = number of response tokens), then project them onto the vocabulary a chunk of tokens at
a time; under gradient each chunk is checkpointed, so backward recomputes its [chunk, V] logits
instead of keeping them. Peak logits memory is `chunk × V`, whatever the sequence length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def policy_forward(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) [n, L, H]; no logits are computed."""
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    return model.base_model(input_ids=ids, attention_mask=attention, position_ids=position).last_hidden_state


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # [chunk, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor,
                      response_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, <t]) at response positions, 0 elsewhere. hidden [n, L, H] → [n, L] fp32."""
    predicts = response_mask[:, 1:]  # position t-1 predicts token t
    hidden_at = hidden[:, :-1][predicts]  # [M, H]
    targets = ids[:, 1:][predicts]  # [M]
    pieces = []
    for start in range(0, targets.numel(), chunk):
        h, t = hidden_at[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, h, lm_head_weight, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, lm_head_weight, t))
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.zeros(predicts.shape, dtype=torch.float32, device=ids.device).masked_scatter(predicts, flat)
    return F.pad(logprobs, (1, 0))  # [n, L]: column 0 predicts nothing


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, clip_eps: float, token_count: int,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """PPO-clip surrogate, token-mean over `token_count` tokens (the whole mini-batch), + optional KL.

    logprobs/old_logprobs/ref_logprobs [n, L]; advantages [n] (one per rationale); response_mask [n, L].
    Returns the loss of these rows (sum over their tokens / token_count) and summed statistics.
    """
    mask = response_mask.float()
    adv = advantages[:, None]  # broadcast over the rationale's tokens
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"clip_frac_sum": ((unclipped != clipped).float() * mask).sum().item()}
    if ref_logprobs is not None and kl_coef > 0:
        # k3 estimator of KL(π || π_ref): exp(r) - r - 1 with r = log π_ref - log π; ≥ 0, low variance.
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
        stats["kl_sum"] = (kl.detach() * mask).sum().item()
    loss = (per_token * mask).sum() / token_count
    return loss, stats
