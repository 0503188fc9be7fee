"""encode.py: the Encoder on the real tiny model. Greedy encoding is deterministic and batch-invariant,
pools exactly the span training pools, rationale="none" is the prompt's plain mean, and the edges
(empty, long, non-str input) behave as documented."""
import numpy as np
import pytest
import torch

from minigrace.embed import forward_rollouts
from minigrace.encode import Encoder, default_lengths
from minigrace.prompts import chat_prompt
from minigrace.rollout import eos_token_ids, generate
from minigrace.worlds.builtin import builtin_corpus, load_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return Encoder(load_tiny(), max_new_tokens=16, max_prompt_len=128)


@pytest.fixture(scope="module")
def texts():
    rows = builtin_corpus(seed=0).heldout[:3]
    # varied lengths, so batching pads and sorting reorders
    return [rows[0]["query"], rows[1]["positive"] + " " + rows[2]["negative"], rows[2]["query"], "coffee"]


def test_greedy_is_deterministic_and_batch_invariant(encoder, texts):
    emb, rationales = encoder.encode(texts, batch_size=4, return_rationales=True)
    assert emb.shape == (len(texts), encoder.get_sentence_embedding_dimension()) and emb.dtype == np.float32
    assert np.array_equal(emb, encoder.encode(texts, batch_size=4))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Each row equals the text encoded alone (no padding, no sorting): batch-invariant, order restored.
    for i, t in enumerate(texts):
        alone, rationale = encoder.encode(t, return_rationales=True)
        assert rationale == rationales[i]
        np.testing.assert_allclose(alone, emb[i], atol=1e-5)


def test_pooled_span_matches_training(encoder, texts):
    """Encoder == rollout.generate (greedy) + embed.forward_rollouts, the trainer's own path."""
    model, tok = encoder.model, encoder.tokenizer
    prompts = [chat_prompt(tok, t, encoder.max_prompt_len) for t in texts]
    rollouts = generate(model, prompts, torch.zeros(len(prompts)), max_new_tokens=encoder.max_new_tokens,
                        eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id)
    train_emb = forward_rollouts(model, rollouts, 16384, 1024, with_logprobs=False).embeddings
    emb, rationales = encoder.encode(texts, return_rationales=True, convert_to_tensor=True)
    assert rationales == tok.batch_decode(rollouts.responses(), skip_special_tokens=True)
    assert all(r.strip() for r in rationales), "the tiny model writes a rationale"
    torch.testing.assert_close(emb, train_emb, atol=1e-5, rtol=1e-5)


def test_rationale_none_is_mean_of_prompt_span(encoder, texts):
    model, tok = encoder.model, encoder.tokenizer
    for text in texts[:2]:
        p = chat_prompt(tok, text, encoder.max_prompt_len)
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([p.ids]), output_hidden_states=True).hidden_states[-1][0]
        mean = hidden[p.pool_start:].mean(0)  # [H]: user text + assistant header, system prompt excluded
        raw = encoder.encode(text, rationale="none", normalize_embeddings=False, convert_to_tensor=True)
        torch.testing.assert_close(raw, mean, atol=1e-5, rtol=1e-5)
        unit = encoder.encode(text, rationale="none", convert_to_tensor=True)
        torch.testing.assert_close(unit, mean / mean.norm(), atol=1e-5, rtol=1e-5)
    _, rationales = encoder.encode(texts, rationale="none", return_rationales=True)
    assert rationales == [""] * len(texts)


def test_output_conventions(encoder, texts):
    h = encoder.get_sentence_embedding_dimension()
    one = encoder.encode(texts[0])
    assert isinstance(one, np.ndarray) and one.shape == (h,)
    t = encoder.encode(texts[:2], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2, h)
    vec, rationale = encoder.encode(texts[0], return_rationales=True)
    assert isinstance(rationale, str) and np.allclose(vec, one, atol=1e-6)
    assert encoder.encode([]).shape == (0, h)
    sim = encoder.similarity(t, t)
    assert sim.shape == (2, 2) and torch.allclose(sim.diagonal(), torch.ones(2), atol=1e-5)
    assert encoder.similarity(one, one).shape == (1, 1)
    torch.testing.assert_close(encoder.similarity_pairwise(t, t), torch.ones(2), atol=1e-5, rtol=0)


def test_sampling_is_seeded(encoder, texts):
    a = encoder.encode(texts, temperature=1.0, seed=3)
    b = encoder.encode(texts, temperature=1.0, seed=3)
    assert np.array_equal(a, b)


def test_empty_string_embeds_the_empty_user_turn(encoder):
    tok = encoder.tokenizer
    p = chat_prompt(tok, "", encoder.max_prompt_len, allow_empty=True)
    assert tok.convert_ids_to_tokens(p.ids[p.pool_start]) == "<|im_end|>"  # pool starts where the text would be
    emb, rationale = encoder.encode("", return_rationales=True)
    assert np.isfinite(emb).all() and abs(np.linalg.norm(emb) - 1) < 1e-5
    np.testing.assert_allclose(encoder.encode(["", "coffee", ""])[[0, 2]], np.stack([emb, emb]), atol=1e-5)


def test_long_texts_are_truncated_with_a_counting_warning(texts):
    model, tok = load_tiny()
    limit = len(chat_prompt(tok, "coffee", 10_000).ids) + 4  # room for the short text, not the long one
    short = Encoder((model, tok), max_new_tokens=4, max_prompt_len=limit)
    long_text = " ".join(texts) * 3
    with pytest.warns(UserWarning, match=rf"1 of 2 texts were longer than max_prompt_len={limit}"):
        emb = short.encode([long_text, "coffee"])
    assert np.isfinite(emb).all()


def test_bad_input_raises_clear_errors(encoder):
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        encoder.encode(["ok", None])
    with pytest.raises(TypeError, match=r"texts\[0\] is int"):
        encoder.encode([3])
    with pytest.raises(TypeError, match="str or a list of str"):
        encoder.encode(42)
    with pytest.raises(ValueError, match="rationale must be one of"):
        encoder.encode(["x"], rationale="think")
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        encoder.encode(["x"], pooling="max")
    with pytest.raises(ValueError, match="needs a rationale"):
        encoder.encode(["x"], rationale="none", pooling="rationale")
    with pytest.raises(ValueError, match="max_prompt_len=20 leaves no room"):
        Encoder(load_tiny(), max_prompt_len=20).encode(["some text"])


def test_lengths_default_to_the_training_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "tiny", "max_new_tokens": 7, "max_prompt_len": 99}')
    (run / "checkpoint-final").mkdir()
    assert default_lengths(str(run / "checkpoint-final")) == (7, 99)
    assert default_lengths("tiny") == (16, 128)  # the model preset
    assert default_lengths("some/hf-model") == (2048, 1024)  # GRACE's evaluation limits
