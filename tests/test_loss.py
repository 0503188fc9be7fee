"""loss.py: chunked response log-probs equal the full-logits ones (values and gradients); the clipped
surrogate and the k3 KL against hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from minigrace.embed import policy_forward
from minigrace.loss import policy_loss, response_logprobs


@pytest.fixture(scope="module")
def tiny_qwen():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).float()


def full_logits_logprobs(model, ids, attention):
    """The naive reference: [n, L, V] logits, log_softmax, gather the next token."""
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=position).logits.float()
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (1, 0))


def make_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding
    attention[2, 9:] = 0  # right padding after EOS
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 6:] = True
    response &= attention.bool()
    return ids, attention, response


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_logprobs_match_full_logits(tiny_qwen, chunk):
    ids, attention, response = make_batch()
    ref = full_logits_logprobs(tiny_qwen, ids, attention) * response
    hidden = policy_forward(tiny_qwen, ids, attention)
    got = response_logprobs(hidden, tiny_qwen.get_output_embeddings().weight, ids, response, chunk)
    assert got.shape == ids.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got[~response] == 0).all()


def test_chunked_logprob_gradients_match_full_logits(tiny_qwen):
    ids, attention, response = make_batch()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    tiny_qwen.zero_grad()
    (full_logits_logprobs(tiny_qwen, ids, attention) * response * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in tiny_qwen.named_parameters()}

    tiny_qwen.zero_grad()
    hidden = policy_forward(tiny_qwen, ids, attention)
    lp = response_logprobs(hidden, tiny_qwen.get_output_embeddings().weight, ids, response, chunk=3)
    (lp * weights).sum().backward()
    for n, p in tiny_qwen.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_policy_loss_hand_computed():
    # Two rationales of two tokens; eps = 0.2.
    old = torch.zeros(2, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.9)], [math.log(0.5), 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2, token_count=3)
    # row 0, A=+1: ratio 1.5 → clipped to 1.2 (min picks 1.2); ratio 0.9 → 0.9.  terms: -1.2, -0.9
    # row 1, A=-2: ratio 0.5 → min(0.5*-2, 0.8*-2) = -1.6 → term +1.6; second token masked.
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.6) / 3, abs=1e-6)
    assert stats["clip_frac_sum"] == 2  # tokens (0,0) and (1,0) were clipped


def test_k3_kl_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero_adv = torch.zeros(1)
    loss, stats = policy_loss(logp, logp, zero_adv, mask, 0.2, 2, ref_logprobs=logp.clone(), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and float(stats["kl_sum"]) == pytest.approx(0.0, abs=1e-7)
    ref = torch.tensor([[-1.5, -2.0]])
    loss, stats = policy_loss(logp, logp, zero_adv, mask, 0.2, 2, ref_logprobs=ref, kl_coef=0.1)
    r = -0.5  # log π_ref − log π at the first token
    assert float(stats["kl_sum"]) == pytest.approx(math.exp(r) - r - 1, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * (math.exp(r) - r - 1) / 2, rel=1e-5)


def test_rows_without_response_tokens_give_zero_loss_and_finite_grads(tiny_qwen):
    """A rationale that is all padding (or a micro-batch with no response token at all) contributes
    exactly 0, never NaN, even next to a row whose advantage is large."""
    ids, attention, response = make_batch()
    response[1] = False
    for mask in (response, torch.zeros_like(response)):
        tiny_qwen.zero_grad()
        hidden = policy_forward(tiny_qwen, ids, attention)
        lp = response_logprobs(hidden, tiny_qwen.get_output_embeddings().weight, ids, mask, chunk=4)
        assert (lp[~mask] == 0).all()
        loss, stats = policy_loss(lp, lp.detach(), torch.tensor([1.0, 1e6, -1.0]), mask, 0.2,
                                  token_count=max(1, int(mask.sum())))
        loss.backward()
        grads = [p.grad for p in tiny_qwen.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        if not mask.any():
            assert loss.item() == 0.0 and all((g == 0).all() for g in grads)


# --- fp32 log-probs under bf16 autocast (issue #13 item 3) -------------------------------------


@pytest.fixture(scope="module")
def llm_scale_qwen():
    """A random Qwen2 whose logits have a trained LLM's size (mean |logit| ≈ 9), where bf16's rounding
    step is 1/16 to 1/8; the decoder is the only other source of noise."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    return model


def rollout_like_batch(n=16, width=96, prompt=48):
    ids = torch.randint(0, 2048, (n, width), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    for i in range(n):
        attention[i, : (i * 7) % 31] = 0  # left padding of different widths
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt:] = True
    return ids, attention, response


def logprobs_of(model, ids, attention, response, rows, chunk=64):
    """Log-probs of `rows` as one micro-batch, trimmed to its own width (as embed.py and step.py do)."""
    real = attention[rows].bool().any(0).nonzero()
    cols = slice(int(real.min()), int(real.max()) + 1)
    hidden = policy_forward(model, ids[rows][:, cols], attention[rows][:, cols])
    out = torch.zeros(len(rows), ids.shape[1])
    out[:, cols] = response_logprobs(hidden, model.lm_head.weight, ids[rows][:, cols], response[rows][:, cols], chunk)
    return out


def test_logprobs_under_bf16_autocast_are_the_fp32_ones(llm_scale_qwen):
    """The chunk's logits, the hidden gradient and the lm_head gradient are the fp32 computation,
    bit for bit, under CPU bf16 autocast (before: bf16 logits, log-probs off by up to 0.2)."""
    ids, attention, response = rollout_like_batch()
    with torch.no_grad():
        hidden = policy_forward(llm_scale_qwen, ids, attention)
    weight = llm_scale_qwen.lm_head.weight
    results = []
    for autocast in (False, True):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp = response_logprobs(h, w, ids, response, chunk=64)
            (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        results.append((lp.detach(), h.grad, w.grad))
    for fp32, under_autocast in zip(*results):
        assert under_autocast.dtype == torch.float32 and torch.equal(fp32, under_autocast)


def test_first_update_ratio_is_one_under_bf16_autocast(llm_scale_qwen):
    """Old log-probs from the no-grad embedding pass, new ones from training micro-batches, both under
    bf16 autocast: the same micro-batch gives ratio exactly 1, and micro-batches of other widths (the
    decoder rounds a little differently) stay far inside the clip band: clip_frac 0 on step 1.
    Measured here: max |ratio − 1| 0.077 (before, with bf16 logits: 0.28, 0.4% of the tokens outside 1 ± 0.2)."""
    ids, attention, response = rollout_like_batch()
    everything = list(range(len(ids)))
    advantages = torch.tensor([1.0, -1.0]).repeat(len(ids) // 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            old = logprobs_of(llm_scale_qwen, ids, attention, response, everything)
        same = logprobs_of(llm_scale_qwen, ids, attention, response, everything)
        regrouped = torch.cat([logprobs_of(llm_scale_qwen, ids, attention, response, list(range(i, i + 4)))
                               for i in range(0, len(ids), 4)])
    assert torch.equal(same, old)
    _, stats = policy_loss(same, old, advantages, response, 0.2, int(response.sum()))
    assert stats["clip_frac_sum"] == 0
    ratio = torch.exp(regrouped - old)[response]
    assert (ratio - 1).abs().max() < 0.15
    _, stats = policy_loss(regrouped, old, advantages, response, 0.2, int(response.sum()))
    assert stats["clip_frac_sum"] == 0


# --- verl's policy loss: clip fraction, dual clip, KL clamp (issue #15 part 2) -------------------


def test_clip_frac_counts_only_tokens_where_the_clip_was_active():
    # ratio 0.5 with A > 0 and ratio 1.5 with A < 0 are outside the band, but the unclipped term is the
    # larger loss, so it is taken and has a gradient: not clipped (TRL's count). Before: counted.
    old = torch.zeros(4, 1)
    new = torch.log(torch.tensor([[0.5], [1.5], [1.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    new.requires_grad_()
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2, token_count=4)
    assert stats["clip_frac_sum"] == 2
    # losses: -0.5, 1.5, -1.2 (clipped), 0.8 (clipped)
    assert loss.item() == pytest.approx((-0.5 + 1.5 - 1.2 + 0.8) / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(new.grad.squeeze(1), torch.tensor([-0.5, 1.5, 0.0, 0.0]) / 4)


def verl_policy_loss(logprobs, old_logprobs, advantages, mask, eps, clip_ratio_c, token_count):
    """verl 0.4 compute_policy_loss (GRACE's trainer) written from its formula, token-mean aggregation."""
    adv = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    loss1, loss2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.min(-adv * clip_ratio_c, clipped)
    per_token = torch.where(adv < 0, dual, clipped)
    lower = (torch.gt(clipped, -adv * clip_ratio_c) & (adv < 0)).float()
    return (per_token * mask).sum() / token_count, (lower * mask).sum()


def test_dual_clip_matches_verl():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(6, 20, generator=g)
    new = (old + 1.5 * torch.randn(6, 20, generator=g)).requires_grad_()  # ratios 0.01 .. 100
    adv = torch.randn(6, generator=g)
    mask = torch.rand(6, 20, generator=g) > 0.2
    ref_new = new.detach().clone().requires_grad_()
    loss, stats = policy_loss(new, old, adv, mask, 0.2, 100.0, dual_clip=3.0)
    ref, ref_lower = verl_policy_loss(ref_new, old, adv, mask.float(), 0.2, 3.0, 100.0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(new.grad, ref_new.grad)
    assert stats["dual_clip_frac_sum"] == ref_lower.item() > 0
    # A = -2, ratio 5: unclipped loss 10 > 3 * 2 → held at 6 with no gradient; without dual clip: 10.
    one = torch.tensor([[math.log(5.0)]], requires_grad=True)
    held, stats = policy_loss(one, torch.zeros(1, 1), torch.tensor([-2.0]), torch.ones(1, 1, dtype=torch.bool),
                              0.2, 1, dual_clip=3.0)
    held.backward()
    assert held.item() == pytest.approx(6.0) and one.grad.item() == 0 and stats["dual_clip_frac_sum"] == 1
    free, _ = policy_loss(one, torch.zeros(1, 1), torch.tensor([-2.0]), torch.ones(1, 1, dtype=torch.bool), 0.2, 1)
    assert free.item() == pytest.approx(10.0)


def test_kl_clamp_bounds_the_k3_term_like_verl():
    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, 2.0, 200.0]])  # q = 0.5, 3, 201: k3 = 0.149, 16.09 (→ 10), overflow (→ 10)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1), mask, 0.2, 3, ref_logprobs=ref, kl_coef=0.1,
                              kl_clamp=10.0)
    k3 = math.exp(0.5) - 0.5 - 1
    assert float(stats["kl_sum"]) == pytest.approx(k3 + 10 + 10, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * (k3 + 20) / 3, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 0].item() == pytest.approx(-0.1 * (math.exp(0.5) - 1) / 3, rel=1e-5)


def test_an_extreme_ratio_gives_a_finite_gradient():
    """log π − log π_old = 100 overflows exp in fp32; the dual clip's zero gradient times inf was NaN."""
    new = torch.tensor([[100.0, 0.1]], requires_grad=True)
    loss, _ = policy_loss(new, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2, dtype=torch.bool), 0.2, 2,
                          dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3.0 + math.exp(0.1)) / 2, rel=1e-6)
    assert torch.isfinite(new.grad).all() and new.grad[0, 0] == 0
