"""The built-in corpus and tiny model: determinism, splits, chat format, cache, and the designed flaw.

`tiny` (tests/conftest.py) is the real built-in model shipped in minigrace/worlds/tiny/, loaded once per session."""
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

from minigrace.worlds import builtin, publish
from minigrace.worlds.builtin import (TinySettings, builtin_corpus, embed_with_rationales, load_tiny, rationale_for,
                                      rationale_topic, retrieval_scores, write_rationales)
from minigrace.prompts import SYSTEM_PROMPT, chat_prompt, render_chat


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus()


def _all_texts(rows):
    return {t for r in rows for t in (r["query"], r["positive"], r["negative"])}


def _words(text):
    return set(re.findall(r"[a-z]+", text))


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
        assert len(set(corpus.topic_keywords[topic]) & _words(r["query"]) & _words(r["positive"])) >= 2
        for text in (r["query"], r["positive"], r["negative"]):
            side = corpus.side_topic[text]
            assert side != corpus.text_topic[text]
            assert len(_words(text) & set(corpus.topic_keywords[side])) == 2  # the mention in passing
            assert len(_words(text) & set(corpus.topic_keywords[corpus.text_topic[text]])) >= 3


def test_rationales_and_the_topic_they_name(corpus):
    for text in corpus.texts("heldout")[:50]:
        for topic in (corpus.text_topic[text], corpus.side_topic[text]):
            rationale = rationale_for(text, topic, corpus)
            assert rationale.startswith(f"<think> {topic} ") and rationale.endswith("</think>")
            assert _words(rationale) - {"think", topic} <= _words(text)  # the text's own keywords
            assert rationale_topic(rationale, corpus) == topic
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
    for topic in (corpus.text_topic[text], corpus.side_topic[text]):
        rationale = rationale_for(text, topic, corpus)
        ids = tokenizer(rationale, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == rationale and len(ids) + 1 <= 12  # + EOS


def test_model_writes_a_rationale_ending_with_eos(tiny, corpus):
    model, tokenizer = tiny
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    texts = [r["query"] for r in corpus.heldout[:8]] + [r["positive"] for r in corpus.heldout[:8]]
    for reply in write_rationales(model, tokenizer, texts, max_new_tokens=16):
        assert reply[-1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(reply, skip_special_tokens=True)
        assert decoded.startswith("<think>") and decoded.endswith("</think>")
        assert rationale_topic(decoded, corpus) is not None


def test_greedy_rationale_names_the_side_topic(tiny, corpus):
    """The designed flaw RL has to fix: greedy rationales follow the passing mention."""
    model, tokenizer = tiny
    texts = corpus.texts("heldout")[:150]
    named = [rationale_topic(tokenizer.decode(r, skip_special_tokens=True), corpus)
             for r in write_rationales(model, tokenizer, texts)]
    side_rate = sum(n == corpus.side_topic[t] for n, t in zip(named, texts)) / len(texts)
    true_rate = sum(n == corpus.text_topic[t] for n, t in zip(named, texts)) / len(texts)
    # Measured on this build: 0.83 side / 0.17 true over all 600 held-out texts.
    assert side_rate >= 0.65, f"greedy names the side topic for {side_rate:.0%} of held-out texts"
    assert true_rate <= 0.30


def test_true_topic_rationales_retrieve_better(tiny, corpus):
    """What RL can gain: forcing true-topic rationales beats side-topic ones on held-out retrieval."""
    model, tokenizer = tiny
    rows = corpus.heldout[:100]
    texts = list(_all_texts(rows))
    scores = {}
    for kind, topic_of in [("true", corpus.text_topic), ("side", corpus.side_topic)]:
        replies = [tokenizer(rationale_for(t, topic_of[t], corpus), add_special_tokens=False).input_ids
                   + [tokenizer.eos_token_id] for t in texts]
        scores[kind] = retrieval_scores(rows, dict(zip(texts, embed_with_rationales(model, tokenizer, texts, replies))))["ndcg@10"]
    assert scores["true"] >= scores["side"] + 0.08, scores


# ---------------------------------------------------------------- cache


def test_shipped_model_matches_its_record_and_the_build_settings():
    """Every shipped file hashes to its record, and the record was built from today's TinySettings: a changed
    build setting fails here until the model is rebuilt (`python -m minigrace.worlds.builtin --rebuild`)."""
    record = json.load(open(os.path.join(builtin.SHIPPED_DIR, builtin.BUILD_RECORD)))
    assert builtin.file_hashes(builtin.SHIPPED_DIR) == record["sha256"]
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(record["sha256"])
    assert record["settings"] == dataclasses.asdict(TinySettings())
    assert record["settings_digest"] == TinySettings().digest()
    assert builtin.tiny_dir() == builtin.SHIPPED_DIR  # loads the shipped folder, builds nothing


def test_loading_refuses_a_changed_file_or_other_settings(tmp_path):
    shipped = tmp_path / "tiny"
    shutil.copytree(builtin.SHIPPED_DIR, shipped)
    builtin.check_built(str(shipped), TinySettings())  # an exact copy passes
    with pytest.raises(RuntimeError, match="built with other settings.*--rebuild"):
        builtin.check_built(str(shipped), TinySettings(sft_steps=1201))
    with open(shipped / "model.safetensors", "r+b") as f:  # one flipped byte
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(RuntimeError, match=r"changed: \['model.safetensors'\]"):
        builtin.check_built(str(shipped), TinySettings())


def test_shipped_model_reloads_with_identical_weights(tiny):
    model, _ = tiny
    again, tokenizer = load_tiny()
    reference = model.state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in again.state_dict().items())
    assert tokenizer.chat_template


SMALL = TinySettings(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, sft_steps=3, batch_size=4)


def test_build_is_deterministic_atomic_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, _ = load_tiny(str(tmp_path / "a"), settings=SMALL)
    second, _ = load_tiny(str(tmp_path / "b"), settings=SMALL)
    assert all(torch.equal(t, second.state_dict()[n]) for n, t in first.state_dict().items())
    (folder,) = os.listdir(tmp_path / "a")  # published by rename: no half-built folder left behind
    assert folder == os.path.basename(builtin.tiny_path(settings=SMALL))
    path = tmp_path / "a" / folder
    assert (path / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(path).config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(path).chat_template


def test_rebuild_replaces_the_folder_and_records_what_it_built(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "stale.bin").write_text("from an older build")
    record = builtin.rebuild(str(target), SMALL, progress=False)
    assert not (target / "stale.bin").exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert record["sha256"] == builtin.file_hashes(str(target))
    assert json.load(open(target / builtin.BUILD_RECORD)) == record
    builtin.check_built(str(target), SMALL)
    model, _ = load_tiny(str(tmp_path / "cache"), settings=SMALL)  # the same bits as a cache build
    from safetensors.torch import load_file
    rebuilt = load_file(str(target / "model.safetensors"))
    assert all(torch.equal(rebuilt[k], v) for k, v in model.state_dict().items() if k in rebuilt)


def test_publish_keeps_the_first_builders_folder(tmp_path):
    winner, loser = tmp_path / "final", tmp_path / "final.tmp-x"
    winner.mkdir()
    (winner / "w").write_text("winner")
    loser.mkdir()
    (loser / "w").write_text("loser")
    publish(str(loser), str(winner))
    assert (winner / "w").read_text() == "winner" and not loser.exists()
