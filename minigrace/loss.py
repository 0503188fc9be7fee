"""Loss: response log-probs without [B, T, V] logits, and the clipped policy-gradient objective.

Log-probs are needed only where a response token is predicted. We gather those hidden states
([M, H], M = number of response tokens), then project them onto the vocabulary a chunk of tokens at
a time, keeping only each token's logsumexp. Backward recomputes one chunk's [chunk, V] logits at a
time, turns them into d logp / d logits = onehot(target) - softmax in place, and accumulates the
lm_head gradient in place. Peak memory is one [chunk, V] buffer + the weight's gradient, whatever
the sequence length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def policy_forward(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) [n, L, H]; no logits are computed.

    Goes through the model's own forward (not its inner decoder), so DDP / FSDP / peft wrappers see
    the call: an empty `logits_to_keep` makes the lm_head project zero positions."""
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=position, use_cache=False,
                output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    return out.hidden_states[-1]


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(targets | hidden) under lm_head `weight`, `chunk` rows at a time. hidden [M, H] → [M] fp32."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, chunk):
        logprobs = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        for start in range(0, targets.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight).float()  # [chunk, V]: the only large buffer
            target_logit = logits.gather(-1, targets[rows, None]).squeeze(-1)
            top = logits.amax(-1, keepdim=True)
            lse[rows] = logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)  # in place: no second buffer
            logprobs[rows] = target_logit - lse[rows]
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return logprobs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, targets.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, g = hidden[rows], grad_logprobs[rows].float()
            logits = F.linear(h, weight).float()  # recomputed, never stored across chunks
            # d logp / d logits = onehot(target) - softmax, scaled by the incoming gradient; in place.
            grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g[:, None])
            grad_logits[torch.arange(h.shape[0], device=h.device), targets[rows]] += g
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                if grad_weight.dtype == h.dtype:
                    grad_weight.addmm_(grad_logits.T, h)  # accumulate in place: no second [V, H] buffer
                else:  # autocast: fp32 weight, bf16/fp16 compute
                    grad_weight += (grad_logits.T @ h).to(grad_weight.dtype)
            del logits, grad_logits
        return grad_hidden, grad_weight, None, None


def response_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor,
                      response_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, <t]) at response positions, 0 elsewhere. hidden [n, L, H] → [n, L] fp32."""
    predicts = response_mask[:, 1:]  # position t-1 predicts token t
    hidden_at = hidden[:, :-1][predicts]  # [M, H]
    targets = ids[:, 1:][predicts]  # [M]
    flat = _ChunkedLogprobs.apply(hidden_at, lm_head_weight, targets, chunk)
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
