"""eval.py: the built-in tasks' data, real mteb evaluation of the tiny model offline, and the CLI
(subprocess) with --tasks builtin and --compare."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from minigrace.encode import Encoder
from minigrace.eval import BUILTIN_TASKS, MtebEncoder, builtin_tasks, main, run_tasks
from minigrace.metrics import retrieval_metrics
from minigrace.worlds.builtin import (builtin_clustering_data, builtin_corpus, builtin_retrieval_data, builtin_sts_pairs,
                                      graded_similarity, load_tiny)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus(seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's layout: config.json naming the base model, and checkpoint-final (here: tiny itself)."""
    run = tmp_path_factory.mktemp("run")
    model, tok = load_tiny()
    model.save_pretrained(run / "checkpoint-final")
    tok.save_pretrained(run / "checkpoint-final")
    (run / "config.json").write_text(json.dumps({"model": "tiny", "max_new_tokens": 16, "max_prompt_len": 128}))
    return run


def test_retrieval_metrics_by_hand():
    q = torch.eye(3)
    d = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    m = retrieval_metrics(q, d, torch.tensor([0, 1, 1]))  # query 1 ranks its doc 2nd, query 2 ranks it 1st
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1) / 3)


def test_builtin_data_is_graded_from_corpus_structure(corpus):
    row = corpus.heldout[0]
    assert graded_similarity(row["query"], row["positive"], corpus) == 5  # same topic, two shared keywords
    assert graded_similarity(row["query"], row["negative"], corpus) == 1  # sibling topic
    other = next(r for r in corpus.heldout if r["topic"] not in corpus.domains[
        next(d for d, ts in corpus.domains.items() if row["topic"] in ts)])
    assert graded_similarity(row["query"], other["positive"], corpus) == 0  # other domain
    pairs = builtin_sts_pairs(corpus, 100)
    assert len(pairs) == 100 and {s for _, _, s in pairs} >= {0, 1, 3, 5}

    queries, docs, positive = builtin_retrieval_data(corpus, 60)
    assert len(queries) == 60 and all(docs[p] == r["positive"] for p, r in zip(positive, corpus.heldout))
    train_texts = set(corpus.texts("train"))
    assert not (set(queries) | set(docs)) & train_texts  # held-out texts only

    docs, labels = builtin_clustering_data(corpus, per_topic=4)
    assert len(docs) == len(set(docs)) == 4 * len(corpus.topics) and set(labels) == set(corpus.topics)


def test_mteb_builtin_tasks_offline(tmp_path):
    import mteb

    encoder = Encoder(load_tiny(), max_new_tokens=16, max_prompt_len=128)
    adapter = MtebEncoder(encoder, name="tiny")
    assert isinstance(adapter, mteb.models.EncoderProtocol)
    tasks = builtin_tasks()
    assert [t.metadata.name for t in tasks] == list(BUILTIN_TASKS)
    scores, failed = run_tasks(adapter, tasks, str(tmp_path), progress=False)
    assert not failed
    assert set(scores) == set(BUILTIN_TASKS)
    assert all(math.isfinite(s) for s in scores.values())
    assert 0 < scores["MiniGraceRetrieval"] <= 1  # nDCG@10
    assert 0 <= scores["MiniGraceClustering"] <= 1  # v-measure
    assert -1 <= scores["MiniGraceSTS"] <= 1  # Spearman
    written = {p.name for p in tmp_path.rglob("*.json")}
    assert {f"{n}.json" for n in BUILTIN_TASKS} <= written  # mteb's result JSON
    meta = json.loads(next(tmp_path.rglob("model_meta.json")).read_text())
    assert meta["name"] == "minigrace/tiny"  # our ModelMeta, not mteb's placeholder


def test_adapter_embeds_each_text_once_and_matches_the_encoder(one_thread):
    encoder = Encoder(load_tiny(), max_new_tokens=8, max_prompt_len=64)
    adapter = MtebEncoder(encoder, name="tiny")
    texts = ["flour and yeast", "a comet orbit", "flour and yeast"]
    first = adapter.encode([{"text": texts[:2]}, {"text": texts[2:]}])
    assert len(adapter.cache) == 2 and np.array_equal(first[0], first[2])
    np.testing.assert_allclose(first, encoder.encode(texts), atol=1e-6)
    again = adapter.encode([{"text": ["a comet orbit", "kettle descaling"]}])  # one cached, one new
    assert len(adapter.cache) == 3 and np.array_equal(again[0], first[1])
    np.testing.assert_allclose(again[1], encoder.encode("kettle descaling"), atol=1e-6)
    assert adapter.encode([{"text": []}]).shape == (0, encoder.get_sentence_embedding_dimension())


def test_cli_builtin_and_compare(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoint-final")
    # --tasks builtin, in process: scores.json + mteb JSON
    assert main(["--model", ckpt, "--tasks", "builtin", "--out", str(tmp_path / "one"), "--quiet"]) == 0
    one = json.loads((tmp_path / "one" / "scores.json").read_text())
    assert set(one["tasks"]) == set(BUILTIN_TASKS)
    # another pooling reaches the encoder: recorded, and other embeddings give other scores
    assert main(["--model", ckpt, "--tasks", "builtin", "--pooling", "mix", "--out", str(tmp_path / "mix"),
                 "--quiet"]) == 0
    mix = json.loads((tmp_path / "mix" / "scores.json").read_text())
    assert (one["pooling"], mix["pooling"]) == ("text+rationale", "mix")
    assert [mix["tasks"][t]["score"] for t in BUILTIN_TASKS] != [one["tasks"][t]["score"] for t in BUILTIN_TASKS]
    # the paper's columns, as a user runs it: base read from the run's config.json
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "minigrace.eval", "--model", ckpt, "--tasks", "builtin,NoSuchTask",
         "--compare", "base,base+rationale,trained", "--out", str(out), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NoSuchTask" in proc.stderr and "Traceback" not in proc.stderr
    assert "Base" in proc.stdout and "+reasoning" in proc.stdout and "GRACE" in proc.stdout
    summary = json.loads((out / "compare.json").read_text())
    assert summary["columns"] == ["Base", "+reasoning", "GRACE"] and summary["base"] == "tiny"
    for task, row in summary["tasks"].items():
        assert all(math.isfinite(row[c]) for c in summary["columns"])
        # same model, same greedy settings → the trained column equals the single run, and +reasoning too
        assert row["GRACE"] == one["tasks"][task]["score"] == row["+reasoning"]
    assert summary["average"]["n_tasks"] == 3


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--compare" in capsys.readouterr().out
    lonely = tmp_path / "ckpt"
    lonely.mkdir()
    assert main(["--model", str(lonely), "--compare", "base,trained", "--out", str(tmp_path / "o")]) == 2
    assert "pass --base MODEL" in capsys.readouterr().err
    assert main(["--model", "tiny", "--compare", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "unknown column 'bogus'" in capsys.readouterr().err
    assert main(["--model", "tiny", "--rationale", "none", "--pooling", "mix", "--out", str(tmp_path / "o")]) == 2
    assert "--pooling mix needs a rationale" in capsys.readouterr().err
