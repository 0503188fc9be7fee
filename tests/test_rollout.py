"""rollout.py: batched KV-cached generation equals unbatched generation; masks mark the right tokens."""
import torch

from minigrace.embed import forward_rollouts, microbatches
from minigrace.prompts import chat_prompt
from minigrace.rollout import eos_token_ids, generate

TEXTS = ["a short guide to observatory and quasar", "notes on bacteria: pair it with enzyme",
         "looking for jersey ideas with offside (see also rooftop)"]


def _generate(model, tok, texts, temperature=0.0, max_new_tokens=12, seed=0):
    prompts = [chat_prompt(tok, t, 128) for t in texts]
    temps = torch.full((len(prompts),), temperature)
    return prompts, generate(model, prompts, temps, max_new_tokens=max_new_tokens, eos_ids=eos_token_ids(model, tok),
                             pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))


def test_batched_greedy_equals_unbatched(tiny):
    model, tok = tiny
    _, batched = _generate(model, tok, TEXTS)
    for row, text in enumerate(TEXTS):
        _, single = _generate(model, tok, [text])
        assert batched.responses()[row] == single.responses()[0]


def test_batched_sampling_equals_unbatched_with_the_same_noise(tiny):
    """Each row draws its tokens from its own noise row, so a sampled rollout does not depend on the
    other rows of the batch (what lets 1 and N data-parallel ranks produce the same rollouts)."""
    model, tok = tiny
    prompts = [chat_prompt(tok, t, 128) for t in TEXTS]
    assert len({len(p.ids) for p in prompts}) == len(prompts)  # different lengths: real left padding
    noise = torch.rand(len(TEXTS), 12, generator=torch.Generator().manual_seed(5))
    temps = torch.tensor([1.0, 0.5, 1.0])
    kw = dict(max_new_tokens=12, eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id)
    batched = generate(model, prompts, temps, noise=noise, **kw).responses()
    for row in range(len(TEXTS)):
        single = generate(model, prompts[row:row + 1], temps[row:row + 1], noise=noise[row:row + 1], **kw)
        assert batched[row] == single.responses()[0]
    assert len(set(map(tuple, batched))) == len(TEXTS)


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    prompts, ours = _generate(model, tok, TEXTS[:1])
    ids = torch.tensor([prompts[0].ids])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                         eos_token_id=eos_token_ids(model, tok), pad_token_id=tok.pad_token_id)
    assert ours.responses()[0] == ref[0, ids.shape[1]:].tolist()[:len(ours.responses()[0])]


def test_masks(tiny):
    model, tok = tiny
    prompts, r = _generate(model, tok, TEXTS, temperature=1.0, max_new_tokens=6)
    eos = set(eos_token_ids(model, tok))
    P = r.prompt_width
    for row, p in enumerate(prompts):
        response = r.responses()[row]
        assert r.response_mask[row, :P].sum() == 0 and len(response) >= 1
        # A response stops at its first EOS (kept) unless truncated at max_new_tokens.
        if r.truncated[row]:
            assert len(response) == 6 and not eos & set(response)
        else:
            assert response[-1] in eos and not eos & set(response[:-1])
        # pool_mask = from the first user-text token through the end of the response.
        pooled = r.ids[row][r.pool_mask[row]].tolist()
        assert pooled == p.ids[p.pool_start:] + response
        assert r.attention[row].sum() == len(p.ids) + len(response)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = _generate(model, tok, TEXTS, temperature=1.0, seed=3)[1].responses()
    b = _generate(model, tok, TEXTS, temperature=1.0, seed=3)[1].responses()
    assert a == b


def test_microbatched_forward_equals_one_batch(tiny):
    model, tok = tiny
    _, r = _generate(model, tok, TEXTS, temperature=1.0)
    whole = forward_rollouts(model, r, max_tokens_per_microbatch=10_000, logprob_chunk=7)
    split = forward_rollouts(model, r, max_tokens_per_microbatch=1, logprob_chunk=1024)  # one row at a time
    torch.testing.assert_close(whole.embeddings, split.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole.old_logprobs, split.old_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(whole.embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (whole.old_logprobs[~r.response_mask] == 0).all() and (whole.old_logprobs[r.response_mask] < 0).all()


def test_microbatches_respect_token_budget():
    lengths = torch.tensor([5, 5, 9, 2, 2, 2])
    groups = microbatches(lengths, max_tokens=10)
    assert [g.tolist() for g in groups] == [[0, 1], [2], [3, 4, 5]]
    assert torch.cat(groups).tolist() == list(range(6))


def test_inverse_cdf_sampling_matches_the_softmax():
    from minigrace.rollout import sample_next
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]]).expand(40_000, 4)
    uniform = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)]:
        tokens = sample_next(logits, torch.full((40_000,), temperature), top_p, uniform)
        probs = (logits[0] / temperature).softmax(-1)
        if top_p < 1:  # nucleus keeps tokens 0 and 2 (0.61 + 0.22 ≥ 0.7)
            probs = probs * torch.tensor([1.0, 0.0, 1.0, 0.0])
            probs = probs / probs.sum()
        freq = torch.bincount(tokens, minlength=4).float() / 40_000
        torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert (sample_next(logits, torch.zeros(40_000), 1.0, uniform) == 0).all()  # temperature 0: greedy


def test_vllm_rollout_needs_a_gpu_and_falls_back_without_vllm(capsys):
    import importlib.util

    import pytest

    from minigrace.config import GraceConfig
    from minigrace.vllm_rollout import make_vllm_rollout

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_vllm_rollout(GraceConfig(rollout="vllm"), "tiny", torch.device("cpu"), False, False)
    if importlib.util.find_spec("vllm") is None:  # this machine: the HF path takes over, and says so
        assert make_vllm_rollout(GraceConfig(rollout="vllm"), "tiny", torch.device("cuda"), False, False) is None
        assert "falling back to --rollout hf" in capsys.readouterr().out


def test_rollouts_generated_in_parts_equal_one_batch(tiny):
    """--rollout-rows: generating the rows in several batches and concatenating gives the same Rollouts."""
    from minigrace.rollout import cat_rollouts

    model, tok = tiny
    prompts = [chat_prompt(tok, t, 128) for t in TEXTS * 2]
    noise = torch.rand(len(prompts), 10, generator=torch.Generator().manual_seed(1))
    temps = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0, 0.5])
    kw = dict(max_new_tokens=10, eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id)
    whole = generate(model, prompts, temps, noise=noise, **kw)
    parts = cat_rollouts([generate(model, prompts[i:i + 4], temps[i:i + 4], noise=noise[i:i + 4], **kw)
                          for i in (0, 4)], tok.pad_token_id)
    assert parts.prompt_width == whole.prompt_width and parts.ids.shape == whole.ids.shape
    for name in ("ids", "attention", "response_mask", "pool_mask", "truncated", "prompt_truncated"):
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name
