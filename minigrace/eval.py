"""Eval: held-out query → positive retrieval with rationale embeddings.

The proof that GRACE learns is this number going up, never the reward alone: each held-out query
is embedded (with its greedy rationale) and ranked against every held-out document (all positives
and hard negatives); we report recall@1, MRR@10 and nDCG@10 of its own positive.
"""
from __future__ import annotations

import math

import torch

from .encode import embed_texts


def retrieval_metrics(query_emb: torch.Tensor, doc_emb: torch.Tensor, relevant: torch.Tensor, k: int = 10) -> dict:
    """query_emb [Q, H], doc_emb [D, H] (unit norm), relevant [Q] (index of each query's one relevant doc)."""
    scores = query_emb @ doc_emb.T  # [Q, D]
    # Rank of the relevant doc = number of docs scoring strictly higher (ties count in its favour).
    rank = (scores > scores.gather(1, relevant[:, None])).sum(1)  # [Q], 0-based
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank, dtype=torch.float))
    mrr = torch.where(hit, 1.0 / (rank.float() + 1.0), torch.zeros_like(rank, dtype=torch.float))
    return {"recall@1": float((rank == 0).float().mean()), f"mrr@{k}": float(mrr.mean()),
            f"ndcg@{k}": float(ndcg.mean())}


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
