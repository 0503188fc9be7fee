"""Eval: does the model embed well? Held-out retrieval for the trainer, MTEB for everyone else.

    python -m minigrace.eval --model runs/<run>/checkpoint-final                     # built-in tasks, offline
    python -m minigrace.eval --model CKPT --tasks everyday                          # held-out everyday English
    python -m minigrace.eval --model CKPT --tasks realtext                          # held-out Debian / Python docs
    python -m minigrace.eval --model CKPT --tasks STS12,SciFact                     # real MTEB tasks (local HF cache)
    python -m minigrace.eval --model CKPT --compare base,base+rationale,trained    # the paper's columns

Three parts, top to bottom:
  1. held-out retrieval (recall@1 / MRR@10 / nDCG@10), which the trainer runs before and after training;
  2. MTEB: an adapter that gives an Encoder mteb 2.x's encoder protocol, and three sets of three offline tasks
     (retrieval, graded STS, clustering) that run with no network: `builtin`, from the built-in corpus's
     held-out texts, `everyday`, from the hand-written held-out English set (minigrace/worlds/everyday.py),
     and `realtext`, from held-out Debian package descriptions and Python docs (minigrace/worlds/realtext.py);
  3. the command line: run tasks by name, write mteb's result JSON, print a table by task category.

Every text (query or document) gets the same system prompt and a greedy rationale, as in training;
mteb's query/document prompt types are ignored (GRACE uses no instructions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch

from .encode import Encoder, cos_sim, embed_texts, pairwise_cos_sim, run_config
from .metrics import retrieval_metrics
from .rollout import POOLINGS
from .worlds.everyday import EVERYDAY_TASKS
from .worlds.realtext import REALTEXT_TASKS

# -----------------------------------------------------------------------------
# 1. Held-out retrieval (used by the trainer)


def heldout_retrieval(model, tokenizer, examples, *, max_new_tokens: int, max_prompt_len: int,
                      rationale: bool = True, batch_size: int = 64) -> tuple[dict, list[str], list[str]]:
    """Examples with query/text(/negative) → (metrics, doc rationales, query rationales)."""
    docs = list(dict.fromkeys([ex.text for ex in examples] + [ex.negative for ex in examples if ex.negative]))
    doc_index = {d: i for i, d in enumerate(docs)}
    relevant = torch.tensor([doc_index[ex.text] for ex in examples])
    kw = dict(max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, rationale=rationale, batch_size=batch_size)
    query_emb, query_rationales = embed_texts(model, tokenizer, [ex.query for ex in examples], **kw)
    doc_emb, doc_rationales = embed_texts(model, tokenizer, docs, **kw)
    metrics = retrieval_metrics(query_emb, doc_emb, relevant)
    assert all(math.isfinite(v) for v in metrics.values())
    return metrics, doc_rationales, query_rationales


# -----------------------------------------------------------------------------
# 2a. MTEB adapter


def model_slug(name: str) -> str:
    """A short file-safe name: 'runs/abc/checkpoint-final' → 'abc-checkpoint-final'."""
    parts = [p for p in re.split(r"[\\/]+", str(name).rstrip("/\\")) if p not in ("", ".", "..")]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts[-2:]) or "model")


class MtebEncoder:
    """mteb 2.x's encoder protocol around an Encoder.

    mteb calls encode(DataLoader of {"text": [...]} batches, task_metadata=..., hf_split=...,
    hf_subset=..., prompt_type=...). We embed all texts of the call at once (the Encoder sorts them
    by length for batching). `mteb_model_meta` must exist, or mteb silently swaps in a placeholder.
    """

    def __init__(self, encoder: Encoder, rationale: str = "generate", name: str | None = None,
                 temperature: float = 0.0, seed: int = 0, show_progress_bar: bool = False,
                 pooling: str = "text+rationale"):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        self.encoder, self.rationale = encoder, rationale
        self.cache: dict[str, np.ndarray] = {}  # text → embedding: tasks share texts (greedy is exact)
        self.temperature, self.seed, self.show_progress_bar = temperature, seed, show_progress_bar
        self.pooling = pooling
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=f"minigrace/{model_slug(name or encoder.name)}",
            revision="local",
            n_parameters=sum(p.numel() for p in encoder.model.parameters()),
            embed_dim=encoder.get_sentence_embedding_dimension(),
            max_tokens=encoder.max_prompt_len,
            similarity_fn_name=ScoringFunction.COSINE,
            framework=["PyTorch", "Transformers"],
            use_instructions=False,
            experiment_kwargs={"rationale": rationale, "max_new_tokens": encoder.max_new_tokens,
                               "temperature": temperature, "pooling": pooling},
        ))

    def encode(self, inputs, *, task_metadata=None, hf_split: str = "", hf_subset: str = "", prompt_type=None,
               **kwargs):
        """Each distinct text is embedded once per adapter (an mteb run's tasks share texts); with
        temperature > 0 every call samples afresh."""
        texts = [text for batch in inputs for text in batch["text"]]
        new = texts if self.temperature > 0 else list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            emb = self.encoder.encode(new, batch_size=kwargs.get("batch_size", 32), rationale=self.rationale,
                                      temperature=self.temperature, seed=self.seed, pooling=self.pooling,
                                      show_progress_bar=self.show_progress_bar)  # numpy [n, H] fp32
            if self.temperature > 0:
                return emb
            self.cache.update(zip(new, emb))
        if not texts:
            return np.zeros((0, self.encoder.get_sentence_embedding_dimension()), dtype=np.float32)
        return np.stack([self.cache[t] for t in texts])  # [N, H]

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        return pairwise_cos_sim(embeddings1, embeddings2)


# -----------------------------------------------------------------------------
# 2b. Built-in tasks: the built-in corpus's held-out texts, graded from the corpus structure (no model)

BUILTIN_TASKS = ("MiniGraceRetrieval", "MiniGraceSTS", "MiniGraceClustering")



def in_memory_tasks(names: tuple[str, str, str], dataset_path: str, retrieval, sts_pairs, clustering,
                    descriptions: tuple[str, str, str], sts_range: tuple[int, int]) -> list:
    """Retrieval, STS and clustering mteb tasks over data already in memory (no network, no HF cache).

    retrieval: (queries, documents, index of each query's relevant document); sts_pairs: [(text1, text2,
    score)] with scores in sts_range; clustering: (texts, labels)."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    def task_metadata(name: str, type_: str, main_score: str, description: str) -> TaskMetadata:
        return TaskMetadata(
            name=name, type=type_, main_score=main_score, description=description,
            reference="https://github.com/GasolSun36/GRACE", dataset={"path": dataset_path, "revision": "1"},
            category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            date=("2026-01-01", "2026-01-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
            annotations_creators="derived", dialect=[], sample_creation="created", bibtex_citation="")

    class Retrieval(AbsTaskRetrieval):
        metadata = task_metadata(names[0], "Retrieval", "ndcg_at_10", descriptions[0])

        def load_data(self, num_proc=None, **kwargs):
            queries, docs, positive = retrieval
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(queries))], "text": queries}),
                corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(len(docs))], "text": docs}),
                relevant_docs={f"q{i}": {f"d{p}": 1} for i, p in enumerate(positive)},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    class STS(AbsTaskSTS):
        metadata = task_metadata(names[1], "STS", "cosine_spearman", descriptions[1])
        min_score, max_score = sts_range

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [a for a, _, _ in sts_pairs], "sentence2": [b for _, b, _ in sts_pairs],
                "score": [s for _, _, s in sts_pairs]})})
            self.data_loaded = True

    class Clustering(AbsTaskClustering):
        metadata = task_metadata(names[2], "Clustering", "v_measure", descriptions[2])
        max_fraction_of_documents_to_embed = None  # embed them all (the default samples 4%)

        def load_data(self, num_proc=None, **kwargs):
            docs, labels = clustering
            self.max_documents_per_cluster = len(docs)
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentences": docs, "labels": labels})})
            self.data_loaded = True

    for cls, name in zip((Retrieval, STS, Clustering), names):
        cls.__name__ = cls.__qualname__ = name
    return [Retrieval(), STS(), Clustering()]


def builtin_tasks(n_queries: int = 60, n_pairs: int = 100, per_topic: int = 6) -> list:
    """The three built-in mteb tasks, made from the built-in corpus's held-out texts."""
    from .worlds.builtin import builtin_clustering_data, builtin_corpus, builtin_retrieval_data, builtin_sts_pairs

    corpus = builtin_corpus(seed=0)  # the trainer's corpus: held-out texts are never trained on
    return in_memory_tasks(
        BUILTIN_TASKS, "minigrace/builtin",
        builtin_retrieval_data(corpus, n_queries), builtin_sts_pairs(corpus, n_pairs),
        builtin_clustering_data(corpus, per_topic),
        (f"{n_queries} held-out built-in queries → their positives among all their positives and sibling-topic "
         "hard negatives.",
         f"{n_pairs} built-in held-out text pairs graded 0-5 from the corpus structure: 0 other domain, "
         "1 sibling topic, 3 same topic, +1 per shared topic keyword.",
         f"{per_topic} built-in held-out documents per topic, clustered into the 24 topics "
         "(v-measure; random embeddings score about 0.55 here)."),
        sts_range=(0, 5))


def everyday_tasks() -> list:
    """The three held-out tasks of the hand-written everyday English set (minigrace/worlds/everyday.py)."""
    from .worlds.everyday import (EVERYDAY_TASKS, everyday_clustering_data, everyday_retrieval_data,
                                  everyday_sts_pairs)

    return in_memory_tasks(
        EVERYDAY_TASKS, "minigrace/everyday",
        everyday_retrieval_data(), everyday_sts_pairs(), everyday_clustering_data(),
        ("48 held-out everyday questions (8 domains) → their answer among all 48 held-out answers.",
         "192 held-out pairs graded 0-3 from the data's structure: 3 paraphrase, 2 question and its answer, "
         "1 same domain, 0 different domains.",
         "144 held-out questions, paraphrases and answers clustered into their 8 domains (v-measure)."),
        sts_range=(0, 3))


def realtext_tasks() -> list:
    """The three held-out tasks of the real-text set (minigrace/worlds/realtext.py), from its held-out rows."""
    from .worlds.realtext import realtext_clustering_data, realtext_retrieval_data, realtext_rows, realtext_sts_pairs

    rows = realtext_rows("heldout")
    pairs, (texts, labels) = realtext_sts_pairs(rows), realtext_clustering_data(rows)
    return in_memory_tasks(
        REALTEXT_TASKS, "minigrace/realtext",
        realtext_retrieval_data(rows), pairs, (texts, labels),
        (f"{len(rows)} held-out Debian package short descriptions and Python docstring summaries / reference "
         "headings → their own long text among all held-out texts (same-section items are the hard negatives).",
         f"{len(pairs)} held-out (query of A, text of B) pairs graded 0-2 from the data's structure: 2 B is A, "
         "1 B is another item of A's section, 0 B is from another section of the same source.",
         f"{len(texts)} held-out texts clustered into their {len(set(labels))} sections (v-measure)."),
        sts_range=(0, 2))


# -----------------------------------------------------------------------------
# 2c. Running tasks

IN_MEMORY = {"builtin": builtin_tasks, "everyday": everyday_tasks, "realtext": realtext_tasks}  # offline sets
TASK_SET = {**dict.fromkeys(BUILTIN_TASKS, builtin_tasks), **dict.fromkeys(EVERYDAY_TASKS, everyday_tasks),
            **dict.fromkeys(REALTEXT_TASKS, realtext_tasks)}  # one offline task by name → the set it is in
CATEGORY_ORDER = ["Retrieval", "Reranking", "Clustering", "PairClassification", "Classification", "STS",
                  "Summarization"]


def hf_cache_hint(name: str) -> str:
    return (f"task {name}: its data is not in the local HF cache, and nothing is downloaded (offline).\n"
            f"    To get it, on a machine with internet run:\n"
            f"        python -c \"import mteb; mteb.get_task('{name}').load_data()\"\n"
            f"    then copy ~/.cache/huggingface (or $HF_HOME / $HF_DATASETS_CACHE) to this machine.")


def load_tasks(names: list[str], languages: list[str] | None = None) -> tuple[list, dict[str, str]]:
    """Task names ('builtin' / 'everyday' / 'realtext' for the offline sets, or one task of them, or mteb task
    names whose data is in the local HF cache) → (tasks with their data loaded, {name: why not run})."""
    import mteb

    tasks, skipped = [], {}
    for name in dict.fromkeys(names):
        if name.lower() in IN_MEMORY:
            tasks += IN_MEMORY[name.lower()]()
            continue
        if name in TASK_SET:
            tasks += [t for t in TASK_SET[name]() if t.metadata.name == name]
            continue
        try:
            task = mteb.get_task(name, languages=languages or None)
        except KeyError as e:
            hint = e.args[0] if e.args else ""
            skipped[name] = f"task {name}: mteb {mteb.__version__} has no task of that name ({hint})"
            continue
        try:
            task.load_data()
        except Exception as e:  # offline: ConnectionError / DatasetNotFoundError / OSError from datasets
            first_line = (str(e).splitlines() or [""])[0][:200]
            skipped[name] = hf_cache_hint(name) + f"\n    ({type(e).__name__}: {first_line})"
            continue
        tasks.append(task)
    return tasks, skipped


def main_score(task_result) -> float:
    """The task's main score, averaged over its evaluated splits and subsets."""
    values = [s["main_score"] for split in task_result.scores.values() for s in split]
    return float(sum(values) / len(values))


def run_tasks(model: MtebEncoder, tasks: list, out_dir: str | None, batch_size: int = 32, progress: bool = True,
              label: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """Evaluate `model` on `tasks` → ({task: main score}, {task: error}). mteb's result JSON goes under
    out_dir/results/<model>/<revision>/<experiment>/<task>.json."""
    import datasets
    import mteb
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()  # per-map bars on tiny in-memory data are noise
    cache = mteb.ResultCache(cache_path=out_dir) if out_dir else None
    scores, failed = {}, {}
    bar = tqdm(tasks, desc=label or "tasks", disable=not progress, leave=False)
    for task in bar:
        name = task.metadata.name
        bar.set_postfix_str(name)
        # Fresh task RNGs, so every model sees the same samples (clustering bootstraps with them).
        task.rng_state, task.np_rng = random.Random(task.seed), np.random.default_rng(task.seed)
        try:
            result = mteb.evaluate(model, task, cache=cache, overwrite_strategy="always", co2_tracker=False,
                                   encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                                   show_progress_bar=False)  # our own bars: tasks and encode
            scores[name] = main_score(result.task_results[0])
        except Exception as e:  # one broken task must not lose the others
            failed[name] = f"task {name} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return scores, failed


# -----------------------------------------------------------------------------
# 2d. Tables

COLUMNS = {"base": "Base", "base+rationale": "+reasoning", "trained": "GRACE"}
COLUMN_ALIASES = {"base+reasoning": "base+rationale", "+reasoning": "base+rationale", "grace": "trained"}


def summarize(scores: dict[str, dict[str, float]], categories: dict[str, str]) -> dict:
    """{column: {task: score}} → tasks, per-category and overall averages (scores ×100), JSON-ready."""
    columns = list(scores)
    tasks = [t for c in CATEGORY_ORDER + sorted(set(categories.values()) - set(CATEGORY_ORDER))
             for t in categories if categories[t] == c]

    def avg(names, col):
        vals = [scores[col][t] * 100 for t in names if t in scores[col]]
        return round(sum(vals) / len(vals), 2) if vals else None

    by_cat = {}
    for t in tasks:
        by_cat.setdefault(categories[t], []).append(t)
    return {
        "columns": columns,
        "tasks": {t: {"category": categories[t], **{c: (round(scores[c][t] * 100, 2) if t in scores[c] else None)
                                                    for c in columns}} for t in tasks},
        "categories": {cat: {"n_tasks": len(ts), **{c: avg(ts, c) for c in columns}} for cat, ts in by_cat.items()},
        "average": {"n_tasks": len(tasks), **{c: avg(tasks, c) for c in columns}},
    }


def format_table(summary: dict) -> str:
    """The summary as a text table: tasks grouped by category, then category averages and the average."""
    cols = summary["columns"]
    width = max([24] + [len(t) + 2 for t in summary["tasks"]])
    fmt = lambda v: f"{v:>11.2f}" if v is not None else f"{'-':>11}"  # noqa: E731
    lines = [" " * width + "".join(f"{c:>11}" for c in cols)]
    for cat in summary["categories"]:
        lines.append(cat)
        for t, row in summary["tasks"].items():
            if row["category"] == cat:
                lines.append(f"  {t:<{width - 2}}" + "".join(fmt(row[c]) for c in cols))
    lines.append("-" * (width + 11 * len(cols)))
    for cat, row in summary["categories"].items():
        lines.append(f"{cat + ' (' + str(row['n_tasks']) + ')':<{width}}" + "".join(fmt(row[c]) for c in cols))
    avg = summary["average"]
    lines.append(f"{'Average (' + str(avg['n_tasks']) + ' tasks)':<{width}}" + "".join(fmt(avg[c]) for c in cols))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 3. Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minigrace.eval",
        description="Evaluate a GRACE model as a text encoder on MTEB tasks, offline. Every text gets GRACE's "
                    "system prompt and a greedy rationale; its embedding is the mean last-layer hidden state "
                    "over user text + assistant header + rationale (the training rule).",
        epilog="examples:\n"
               "  python -m minigrace.eval --model runs/<run>/checkpoint-final                  # built-in tasks\n"
               "  python -m minigrace.eval --model CKPT --tasks STS12,SciFact,builtin\n"
               "  python -m minigrace.eval --model CKPT --compare base,base+rationale,trained  # paper columns\n"
               "  python -m minigrace.eval --model qwen2.5-1.5b --rationale none             # no rationale\n\n"
               "Real MTEB tasks need their data in the local HF cache (nothing is downloaded); a task whose\n"
               "data is missing is reported and skipped. Results: mteb's JSON under OUT/results/, and\n"
               "OUT/scores.json (OUT/compare.json with --compare) with the table.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint directory, alias (tiny, smollm2-135m, qwen2.5-1.5b, ...), "
                        "or HF id in the local cache")
    p.add_argument("--tasks", default="builtin",
                   help="comma-separated mteb task names; 'builtin' = the offline built-in tasks "
                        f"({', '.join(BUILTIN_TASKS)}); 'everyday' = the held-out real-English tasks "
                        f"({', '.join(EVERYDAY_TASKS)}); 'realtext' = the held-out real-text tasks "
                        f"({', '.join(REALTEXT_TASKS)}) (default: builtin)")
    p.add_argument("--compare", default="",
                   help="comma-separated columns among base (base model, no rationale), base+rationale (base "
                        "model with rationale), trained (--model with rationale): the paper's Base / +reasoning "
                        "/ GRACE columns side by side")
    p.add_argument("--base", default="",
                   help="base model for --compare (default: the 'model' field of the checkpoint's run config.json)")
    p.add_argument("--rationale", default="generate", choices=("generate", "none"),
                   help="without --compare: write a rationale (GRACE) or pool the text alone (default: generate)")
    p.add_argument("--pooling", default="text+rationale", choices=POOLINGS,
                   help="how a rationale's embedding is pooled: text+rationale (GRACE's rule, the one training "
                        "uses: one mean over text and rationale tokens), rationale (its tokens alone), mix (the "
                        "text's mean and the rationale's mean, ½ each) (default: text+rationale)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="rationale sampling temperature: 0 = greedy (default), > 0 samples with --seed")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --temperature > 0 (default: 0)")
    p.add_argument("--out", default="", help="output directory (default: runs/eval-<timestamp>)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per generation batch (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="rationale length limit (default: the training run's, else the model preset's, else 2048)")
    p.add_argument("--max-prompt-len", type=int, default=0,
                   help="prompt token limit, longer texts are truncated "
                        "(default: the training run's, else the model preset's, else 1024)")
    p.add_argument("--languages", default="eng",
                   help="comma-separated languages of multilingual mteb tasks to run (default: eng; '' = all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_compare(value: str) -> list[str]:
    cols = []
    for item in filter(None, (s.strip().lower() for s in value.split(","))):
        item = COLUMN_ALIASES.get(item, item)
        if item not in COLUMNS:
            raise ValueError(f"--compare: unknown column {item!r}; choose from {', '.join(COLUMNS)}")
        cols.append(item)
    return list(dict.fromkeys(cols))


def base_model_of(checkpoint: str) -> str:
    """The base model a checkpoint was trained from: its run's config.json 'model' field."""
    cfg = run_config(checkpoint)
    if not cfg:
        raise ValueError(f"--compare needs the base model, and {checkpoint} is not a checkpoint inside a run "
                         f"directory with a config.json: pass --base MODEL")
    return cfg["model"]


def evaluate_columns(args, columns: list[str], tasks: list, out_dir: str) -> tuple[dict, dict]:
    """Run each column's model on `tasks` → ({column label: {task: score}}, {column label: {task: error}})."""
    import gc

    from .encode import default_lengths

    new_tokens, prompt_len = default_lengths(args.model)  # every column uses the checkpoint's limits
    lengths = dict(max_new_tokens=args.max_new_tokens or new_tokens, max_prompt_len=args.max_prompt_len or prompt_len)
    plan: list[tuple[str, str, str]] = []  # (label, model, rationale)
    if columns:
        base = args.base or base_model_of(args.model)
        for col in columns:
            plan.append((COLUMNS[col], args.model if col == "trained" else base,
                         "none" if col == "base" else "generate"))
    else:
        plan.append(("score", args.model, args.rationale))

    scores, failed, loaded = {}, {}, {}
    for label, model_name, rationale in plan:
        if model_name not in loaded:
            loaded.clear()
            gc.collect()
            loaded[model_name] = Encoder(model_name, device=args.device, dtype=args.dtype, **lengths)
            print(f"loaded {loaded[model_name]}", flush=True)
        pooling = args.pooling if rationale == "generate" else "text+rationale"  # no rationale: the text alone
        adapter = MtebEncoder(loaded[model_name], rationale=rationale, name=model_name, pooling=pooling,
                              temperature=args.temperature, seed=args.seed, show_progress_bar=not args.quiet)
        t0 = time.perf_counter()
        scores[label], failed[label] = run_tasks(adapter, tasks, out_dir, args.batch_size, not args.quiet, label)
        print(f"{label}: {model_name}, rationale={rationale}: {len(scores[label])} task(s) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    return scores, failed


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: real tasks read the local HF cache
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .models import ModelNotAvailable, check_model, resolve_device

    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()

    try:
        columns = parse_compare(args.compare)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
        if args.max_new_tokens < 0 or args.max_prompt_len < 0:
            raise ValueError("--max-new-tokens and --max-prompt-len must be ≥ 1 (0 = the default)")
        if args.temperature < 0:
            raise ValueError(f"--temperature must be ≥ 0 (0 = greedy), got {args.temperature}")
        if args.pooling != "text+rationale" and args.rationale == "none" and not columns:
            raise ValueError(f"--pooling {args.pooling} needs a rationale: --rationale none pools the text alone")
        if columns and args.rationale != "generate":
            raise ValueError("--rationale applies without --compare; --compare sets it per column")
        for model in [args.model] + ([args.base or base_model_of(args.model)] if columns else []):
            check_model(model)  # fail before any work
        resolve_device(args.device)
        names = [s.strip() for s in args.tasks.split(",") if s.strip()]
        if not names:
            raise ValueError("--tasks is empty")
        out_dir = args.out or os.path.join("runs", time.strftime("eval-%Y%m%d-%H%M%S"))
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"--out {out_dir} is a file, not a directory: pass a new or existing output directory")

        tasks, skipped = load_tasks(names, [s for s in args.languages.split(",") if s] or None)
        if not tasks:
            reasons = "; ".join(why.splitlines()[0] for why in skipped.values())
            raise ValueError(f"--tasks {args.tasks}: none of them can run ({reasons}); pass builtin, everyday, "
                             f"realtext or mteb task names whose data is in the local HF cache")
        for why in skipped.values():
            print(f"not run: {why}", file=sys.stderr)
        os.makedirs(out_dir, exist_ok=True)
        scores, failed = evaluate_columns(args, columns, tasks, out_dir)
    except (ModelNotAvailable, CheckpointError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    for errors in failed.values():
        for why in errors.values():
            print(f"error: {why}", file=sys.stderr)
    categories = {t.metadata.name: t.metadata.type for t in tasks}
    summary = summarize(scores, categories)
    summary.update(model=args.model, base=(args.base or base_model_of(args.model)) if columns else None,
                   rationale=None if columns else args.rationale, pooling=args.pooling,
                   temperature=args.temperature, seed=args.seed, skipped=skipped, failed=failed)
    path = os.path.join(out_dir, "compare.json" if columns else "scores.json")
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=2)
    print()
    print(format_table(summary))
    print(f"\nwrote {path} and mteb's result JSON under {os.path.join(out_dir, 'results')}")
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
