"""The built-in corpus and tiny model: determinism, splits, chat format, cache, and the designed flaw."""
import os
import re

import pytest
import torch

from minigrace import builtin
from minigrace.builtin import TinySettings, builtin_corpus, load_tiny, rationale_for, rationale_topic
from minigrace.prompts import SYSTEM_PROMPT, chat_prompt, render_chat


@pytest.fixture(scope="session")
def corpus():
    return builtin_corpus()


@pytest.fixture(scope="session")
def tiny():
    """The real built-in model from the shared cache (built once on a fresh machine)."""
    return load_tiny()


def _all_texts(rows):
    return {t for r in rows for t in (r["query"], r["positive"], r["negative"])}


@torch.no_grad()
def _greedy_replies(model, tokenizer, texts, max_new_tokens=16):
    """Greedy reply token ids per text (left-padded batch), cut after the first EOS."""
    prompts = [chat_prompt(tokenizer, t, max_prompt_len=512).ids for t in texts]
    width = max(map(len, prompts))
    input_ids = torch.full((len(texts), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False
    )
    replies = []
    for row in out[:, width:].tolist():
        eos = tokenizer.eos_token_id
        replies.append(row[: row.index(eos) + 1] if eos in row else row)
    return replies


# ---------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded():
    a, b, c = builtin_corpus(0), builtin_corpus(0), builtin_corpus(1)
    assert a.train == b.train and a.heldout == b.heldout
    assert a.train != c.train


def test_corpus_shape(corpus):
    assert len(corpus.train) == 2000 and len(corpus.heldout) == 200
    keys = {"query", "positive", "negative", "topic", "negative_topic"}
    assert all(set(r) == keys for r in corpus.train + corpus.heldout)
    assert len(corpus.topics) == 24 and set(corpus.topic_keywords) == set(corpus.topics)
    words = [w for kws in corpus.topic_keywords.values() for w in kws]
    assert len(words) == len(set(words)) and not set(words) & set(corpus.topics)
    assert len(corpus.texts("train")) == len(_all_texts(corpus.train))


def test_heldout_texts_never_appear_in_train(corpus):
    assert not _all_texts(corpus.heldout) & _all_texts(corpus.train)


def test_triples_share_topic_and_keywords_negatives_are_siblings(corpus):
    domain_of = {t: d for d, ts in corpus.domains.items() for t in ts}
    for r in corpus.train + corpus.heldout:
        topic, neg = r["topic"], r["negative_topic"]
        assert corpus.text_topic[r["query"]] == corpus.text_topic[r["positive"]] == topic
        assert corpus.text_topic[r["negative"]] == neg
        assert neg != topic and domain_of[neg] == domain_of[topic]
        kws = set(corpus.topic_keywords[topic])
        shared = kws & set(re.findall(r"[a-z]+", r["query"])) & set(re.findall(r"[a-z]+", r["positive"]))
        assert len(shared) >= 2
        for text in (r["query"], r["positive"], r["negative"]):
            side = corpus.side_topic[text]
            assert side != corpus.text_topic[text]
            assert set(re.findall(r"[a-z]+", text)) & set(corpus.topic_keywords[side])  # mentioned in passing


def test_rationale_topic(corpus):
    for topic in corpus.topics:
        assert rationale_topic(rationale_for(topic, corpus), corpus) == topic
    assert rationale_topic("<think></think>", corpus) is None
    assert rationale_topic("<think> flour galaxy comet</think>", corpus) == "astronomy"
    assert rationale_topic("<think> flour galaxy</think>", corpus) == "baking"  # tie: first named


# ---------------------------------------------------------------- tokenizer and model


def test_tokenizer_chat_template_round_trip(tiny, corpus):
    _, tokenizer = tiny
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    text = corpus.heldout[0]["positive"]
    rendered = render_chat(tokenizer, text)
    assert rendered == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = chat_prompt(tokenizer, text, max_prompt_len=512)
    assert tokenizer.decode(prompt.ids) == rendered
    assert tokenizer.decode(prompt.ids[prompt.pool_start :]).startswith(text)
    assert tokenizer.decode(prompt.ids[: prompt.pool_start]).endswith("<|im_start|>user\n")
    rationale = rationale_for(corpus.topics[0], corpus)
    ids = tokenizer(rationale, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == rationale and len(ids) + 1 <= 12  # + EOS


def test_model_writes_a_rationale_ending_with_eos(tiny, corpus):
    model, tokenizer = tiny
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    texts = [r["query"] for r in corpus.heldout[:8]] + [r["positive"] for r in corpus.heldout[:8]]
    for reply in _greedy_replies(model, tokenizer, texts):
        assert reply[-1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(reply, skip_special_tokens=True)
        assert decoded.startswith("<think>") and decoded.endswith("</think>")
        assert rationale_topic(decoded, corpus) is not None


def test_greedy_rationale_names_the_side_topic(tiny, corpus):
    """The designed flaw RL has to fix: greedy rationales follow the passing mention."""
    model, tokenizer = tiny
    texts = corpus.texts("heldout")[:120]
    replies = _greedy_replies(model, tokenizer, texts)
    named = [rationale_topic(tokenizer.decode(r, skip_special_tokens=True), corpus) for r in replies]
    side_rate = sum(n == corpus.side_topic[t] for n, t in zip(named, texts)) / len(texts)
    true_rate = sum(n == corpus.text_topic[t] for n, t in zip(named, texts)) / len(texts)
    assert side_rate >= 0.6, f"greedy names the side topic for {side_rate:.0%} of held-out texts"
    assert true_rate <= 0.35


# ---------------------------------------------------------------- cache


def test_cached_model_reloads_with_identical_weights(tiny):
    model, _ = tiny
    again, tokenizer = load_tiny()
    reference = model.state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in again.state_dict().items())
    assert tokenizer.chat_template
    cache = os.path.dirname(builtin.tiny_path())
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]  # no half-built folders left


def test_build_is_deterministic_atomic_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    small = TinySettings(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, sft_steps=3, batch_size=4)
    first, _ = load_tiny(str(tmp_path / "a"), settings=small)
    second, _ = load_tiny(str(tmp_path / "b"), settings=small)
    assert all(torch.equal(t, second.state_dict()[n]) for n, t in first.state_dict().items())
    (folder,) = os.listdir(tmp_path / "a")
    assert folder == os.path.basename(builtin.tiny_path(settings=small))
    path = tmp_path / "a" / folder
    assert (path / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(path).config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(path).chat_template


def test_publish_keeps_the_first_builders_folder(tmp_path):
    winner, loser = tmp_path / "final", tmp_path / "final.tmp-x"
    winner.mkdir()
    (winner / "w").write_text("winner")
    loser.mkdir()
    (loser / "w").write_text("loser")
    builtin._publish(str(loser), str(winner))
    assert (winner / "w").read_text() == "winner" and not loser.exists()
