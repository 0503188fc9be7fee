"""Everyday: a small hand-written English data set for training and evaluating on real language.

Eight everyday domains (cooking, travel, health, money, home repair, pets, fitness, tech help), each
with questions a person would type and a short passage that answers them. Two files, shipped with
the package, written from *different* questions (no sentence appears in both):

    corpora/everyday_train.jsonl     80 rows  {domain, query, positive, negative}      GRACE training
    corpora/everyday_heldout.jsonl   48 rows  {domain, query, paraphrase, positive, negative}   evaluation

A row's negative is the answer to another question of the same domain (a hard negative). Training
uses the train file in minigrace's data format (`python train.py --data everyday`; unsupervised mode
trains on its positives as plain texts). The three held-out tasks below are graded from the data's
structure, not by human raters:

    retrieval    48 queries → their answer among all 48 held-out answers (5 same-domain hard negatives each)
    STS          192 pairs on a 0-3 scale: 3 a question and its paraphrase, 2 a question and its answer,
                 1 two questions of one domain, 0 two questions of different domains
    clustering   all 144 held-out texts (questions, paraphrases, answers) by domain (8 clusters)
"""
from __future__ import annotations

import json
import os

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora")
TRAIN_PATH = os.path.join(CORPUS_DIR, "everyday_train.jsonl")
HELDOUT_PATH = os.path.join(CORPUS_DIR, "everyday_heldout.jsonl")
DOMAINS = ("cooking", "travel", "health", "money", "home repair", "pets", "fitness", "tech help")
EVERYDAY_TASKS = ("EverydayRetrieval", "EverydaySTS", "EverydayClustering")


def everyday_rows(split: str) -> list[dict]:
    """The rows of 'train' or 'heldout', in file order (grouped by domain)."""
    path = {"train": TRAIN_PATH, "heldout": HELDOUT_PATH}[split]
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def everyday_retrieval_data() -> tuple[list[str], list[str], list[int]]:
    """(queries, documents, index of each query's answer): every held-out question against all answers."""
    rows = everyday_rows("heldout")
    return [r["query"] for r in rows], [r["positive"] for r in rows], list(range(len(rows)))


def everyday_sts_pairs() -> list[tuple[str, str, int]]:
    """(text1, text2, score 0-3): four pairs per held-out row (see the module docstring)."""
    rows = everyday_rows("heldout")
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    domains = list(by_domain)
    pairs = []
    for r in rows:
        same = by_domain[r["domain"]]
        position = same.index(r)
        next_domain = by_domain[domains[(domains.index(r["domain"]) + 1) % len(domains)]]
        sibling, other = same[(position + 1) % len(same)], next_domain[position % len(next_domain)]
        pairs += [(r["query"], r["paraphrase"], 3), (r["paraphrase"], r["positive"], 2),
                  (r["query"], sibling["query"], 1), (r["query"], other["query"], 0)]
    return pairs


def everyday_clustering_data() -> tuple[list[str], list[str]]:
    """(texts, domain labels): every held-out question, paraphrase and answer."""
    texts, labels = [], []
    for r in everyday_rows("heldout"):
        for key in ("query", "paraphrase", "positive"):
            texts.append(r[key])
            labels.append(r["domain"])
    return texts, labels
