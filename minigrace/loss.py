"""Loss: response log-probs without [B, T, V] logits, and the clipped policy-gradient objective.

Log-probs are needed only where a response token is predicted. We gather those hidden states
([M, H], M = number of response tokens), then project them onto the vocabulary a chunk of tokens at
a time, keeping only each token's logsumexp. Backward recomputes one chunk's [chunk, V] logits at a
time, turns them into d logp / d logits = onehot(target) - softmax in place, and accumulates the
lm_head gradient in place. Peak memory is one [chunk, V] buffer + the weight's gradient, whatever
the sequence length.

The chunk's logits are fp32 whatever the autocast state or the inputs' dtype (TF32 matmuls on
CUDA). Under bf16 autocast they would be rounded to bf16 (a step of 0.125 at |logit| = 16..32), and
old log-probs (the embedding pass) and new ones (training micro-batches of other shapes) would round
differently: the first update's ratio would not be 1, and the clip would fire on step 1.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _fp32_matmuls(device: torch.device):
    """Autocast off; on CUDA, fp32 matmuls may use TF32 (fp32 accumulation) for the time being."""
    precision = torch.get_float32_matmul_precision()
    with torch.autocast(device.type, enabled=False):
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(precision)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [..., H] through lm_head `weight` [V, H] → logits [..., V] in fp32, autocast off: the numbers
    the chunked log-probs below compute, for the rollout's sampling logits (rollout.fp32_lm_head)."""
    with _fp32_matmuls(hidden.device):
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(targets | hidden) under lm_head `weight`, `chunk` rows at a time. hidden [M, H] → [M] fp32.
    Logits, their gradient and the lm_head gradient are fp32; gradients come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        logprobs = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        with _fp32_matmuls(hidden.device):
            weight32 = weight.float()  # the trainer's fp32 weight itself: no copy
            for start in range(0, targets.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = F.linear(hidden[rows].float(), weight32)  # [chunk, V] fp32: the only large buffer
                target_logit = logits.gather(-1, targets[rows, None]).squeeze(-1)
                top = logits.amax(-1, keepdim=True)
                lse[rows] = logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)  # in place: no second buffer
                logprobs[rows] = target_logit - lse[rows]
                del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        with _fp32_matmuls(hidden.device):
            weight32 = weight.float()
            if ctx.needs_input_grad[1]:  # accumulated in fp32, in place: no second [V, H] buffer
                grad_weight = torch.zeros_like(weight32)
            for start in range(0, targets.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h, g = hidden[rows].float(), grad_logprobs[rows].float()
                logits = F.linear(h, weight32)  # recomputed, never stored across chunks
                # d logp / d logits = onehot(target) - softmax, scaled by the incoming gradient; in place.
                grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g[:, None])
                grad_logits[torch.arange(h.shape[0], device=h.device), targets[rows]] += g
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ weight32
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, h)
                del logits, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
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
                response_mask: torch.Tensor, clip_eps: float, token_count: float,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, *,
                dual_clip: float = 0.0, kl_clamp: float = 0.0) -> tuple[torch.Tensor, dict]:
    """PPO-clip surrogate as verl computes it (GRACE's trainer), token-mean over `token_count` tokens
    (the whole mini-batch), + optional k3 KL to a reference.

    Per token, r = π / π_old:   loss = max(−A·r, −A·clip(r, 1−ε, 1+ε))
    dual clip (c = dual_clip > 1, 0 = off): where A < 0 the loss is at most c·|A| however large r grew.
    KL: k3 = exp(q) − q − 1 with q = log π_ref − log π, at most kl_clamp (0 = unbounded); verl: 10.
    Log-ratios are clamped to ±20 before exp, so an extreme ratio gives 0 gradient, never inf·0 = NaN.

    logprobs/old_logprobs/ref_logprobs [n, L]; advantages [n] (one per rationale); response_mask [n, L].
    Returns the loss of these rows (sum over their tokens / token_count) and summed statistics (0-dim tensors):
    clip_frac_sum: tokens where the clip was active, i.e. the clipped term was taken (r > 1+ε with A > 0,
    r < 1−ε with A < 0; TRL's clipped-region count; a ratio outside the band whose unclipped term is
    the smaller loss is not clipped); dual_clip_frac_sum: tokens held at c·|A| (verl's pg_clipfrac_lower);
    ratio_dev_max: max |r − 1| over the response tokens.
    """
    mask = response_mask.float()
    adv = advantages[:, None]  # broadcast over the rationale's tokens
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    # Statistics stay on the device (0-dim tensors, no host sync per micro-batch); the caller sums them.
    stats = {"clip_frac_sum": ((clipped > unclipped).float() * mask).sum().detach(),
             "dual_clip_frac_sum": torch.zeros((), device=mask.device),
             "ratio_dev_max": ((ratio.detach() - 1).abs() * mask).max()}  # max |r − 1| over response tokens
    if dual_clip > 0:
        bound = -adv * dual_clip  # [n, 1], positive where A < 0
        held = (adv < 0) & (per_token > bound)
        per_token = torch.where(held, bound, per_token)
        stats["dual_clip_frac_sum"] = (held.float() * mask).sum().detach()
    if ref_logprobs is not None and kl_coef > 0:
        # k3 estimator of KL(π || π_ref): exp(q) - q - 1 with q = log π_ref - log π; ≥ 0, low variance.
        q = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        kl = torch.exp(q) - q - 1
        if kl_clamp > 0:
            kl = kl.clamp(-kl_clamp, kl_clamp)
        per_token = per_token + kl_coef * kl
        stats["kl_sum"] = (kl.detach() * mask).sum()
    loss = (per_token * mask).sum() / token_count
    return loss, stats
