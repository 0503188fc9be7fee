"""loss.py: chunked response log-probs equal the full-logits ones (values and gradients); the clipped
surrogate and the k3 KL against hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from minigrace.loss import policy_forward, policy_loss, response_logprobs


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
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and stats["kl_sum"] == pytest.approx(0.0, abs=1e-7)
    ref = torch.tensor([[-1.5, -2.0]])
    loss, stats = policy_loss(logp, logp, zero_adv, mask, 0.2, 2, ref_logprobs=ref, kl_coef=0.1)
    r = -0.5  # log π_ref − log π at the first token
    assert stats["kl_sum"] == pytest.approx(math.exp(r) - r - 1, rel=1e-5)
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
