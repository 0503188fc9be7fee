"""Encode: texts → embeddings, each made from a rationale the model writes (GRACE at inference).

    from minigrace import Encoder
    enc = Encoder("runs/<run>/checkpoint-final")
    emb = enc.encode(["a query", "a document"])        # numpy [2, H], unit norm
    enc.similarity(emb[:1], emb[1:])                    # torch [1, 1] cosine

Each text is wrapped in GRACE's chat (system prompt + user text), the model writes a rationale
(greedy by default, so the same text always gives the same vector), and the embedding is the mean of
the last-layer hidden states over user text + assistant header + rationale + EOS: exactly the
training rule, applied to the token ids (no decode/re-tokenize round trip). rationale="none" pools
the prompt alone (user text + assistant header): the paper's "Base" embedding.

Speed (embed_prompts): texts are batched by length (longest first, within a token budget), the
system prompt is prefilled once per batch, a row leaves the batch at its EOS, and the pooled states are
collected while the rationale is written, so there is no second forward (`python bench/encode_speed.py`).

Defined behaviour at the edges:
  - a text that is not a str: TypeError naming its index;
  - an empty string: embeds the empty user turn (the pool starts where the text would be: the end-of-turn
    marker, the assistant header and the rationale), like sentence-transformers embeds "";
  - a text longer than max_prompt_len tokens (with the template): right-truncated, one warning counting them;
  - an empty list: an empty [0, H] result.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import torch

from .prompts import ChatPrompt, chat_prompt
from .rollout import POOLINGS, eos_token_ids, generate_pooled

# GRACE's evaluation limits (eval_mteb.py: THINKING_MAX_LENGTH, INPUT_MAX_LENGTH).
GRACE_MAX_NEW_TOKENS = 2048
GRACE_MAX_PROMPT_LEN = 1024
RATIONALE_MODES = ("generate", "none")


# -----------------------------------------------------------------------------
# Texts → embeddings (the trainer's held-out evaluation and the Encoder)


def length_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices sorted longest first, cut into batches of at most max_rows rows whose padded size
    (rows × the batch's longest length) stays within max_tokens (a longer row gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def embed_prompts(model, tokenizer, prompts: list[ChatPrompt], *, max_new_tokens: int, batch_size: int = 64,
                  rationale: bool = True, temperature: float = 0.0, seed: int = 0, normalize: bool = True,
                  max_tokens_per_microbatch: int = 16384, progress: bool = False, pooling: str = "text+rationale"
                  ) -> tuple[torch.Tensor, list[list[int]]]:
    """GRACE at inference: write a rationale for each templated prompt, embed prompt + rationale.

    → (embeddings [n, H] fp32 on CPU; rationale token ids, EOS included). rationale=False pools the
    prompt alone. Prompts are batched by length: longest first, ≤ batch_size rows (that bounds the KV
    cache), rows × longest prompt ≤ max_tokens_per_microbatch (that bounds the prefill, whose hidden states
    are kept, as forward_rollouts keeps a micro-batch's); results come back in input order. The pooled
    states are collected while the rationale is written (rollout.generate_pooled): no second forward.
    Row i's sampling noise is drawn for it from `seed`, so a sampled rationale does not depend on the batching.
    pooling: GRACE's text+rationale mean (the training rule), the rationale alone, or a ½/½ mix of the two
    parts' means (rollout.POOLINGS)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    new_tokens = max_new_tokens if rationale else 0
    generator = torch.Generator(device=model.device).manual_seed(seed)
    noise = torch.rand(len(prompts), new_tokens, generator=generator, device=model.device)  # [n, R]
    eos_ids, pad_id = eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    batches = length_batches([len(p.ids) for p in prompts], batch_size, max_tokens_per_microbatch)
    embeddings = torch.empty(len(prompts), model.config.hidden_size, dtype=torch.float32)
    responses: list[list[int]] = [[] for _ in prompts]
    try:
        for index in tqdm(batches, desc="encode", disable=not progress, leave=False):
            temps = torch.full((len(index),), float(temperature))
            rollouts, pooled = generate_pooled(model, [prompts[i] for i in index], temps, max_new_tokens=new_tokens,
                                               eos_ids=eos_ids, pad_id=pad_id, noise=noise[index],
                                               pooling=pooling)  # [b, H]
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1, eps=1e-12)  # as masked_mean_pool does
            embeddings[index] = pooled.cpu()
            for i, ids in zip(index, rollouts.responses()):
                responses[i] = ids
    finally:
        model.train(was_training)
    return embeddings, responses


def embed_texts(model, tokenizer, texts: list[str], *, max_new_tokens: int, max_prompt_len: int,
                batch_size: int = 64, rationale: bool = True, temperature: float = 0.0, seed: int = 0,
                max_tokens_per_microbatch: int = 16384, progress: bool = False
                ) -> tuple[torch.Tensor, list[str]]:
    """Embed non-empty `texts` → (embeddings [n, H] fp32 on CPU, unit norm; rationale strings)."""
    prompts = [chat_prompt(tokenizer, t, max_prompt_len) for t in texts]
    emb, responses = embed_prompts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   rationale=rationale, temperature=temperature, seed=seed,
                                   max_tokens_per_microbatch=max_tokens_per_microbatch, progress=progress)
    return emb, tokenizer.batch_decode(responses, skip_special_tokens=True)


# -----------------------------------------------------------------------------
# Encoder: the sentence-transformers-style front end


def run_config(checkpoint: str) -> dict:
    """The training run's config.json for a checkpoint inside a run directory ({} otherwise)."""
    if not isinstance(checkpoint, str) or not os.path.isdir(checkpoint):
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) and "model" in cfg and "max_new_tokens" in cfg else {}


def default_lengths(model_or_path) -> tuple[int, int]:
    """(max_new_tokens, max_prompt_len): the training run's, else the model preset's, else GRACE's."""
    from .config import PRESETS

    cfg = run_config(model_or_path) if isinstance(model_or_path, str) else {}
    if not cfg and isinstance(model_or_path, str):
        cfg = PRESETS.get(model_or_path, {})
    return (int(cfg.get("max_new_tokens", GRACE_MAX_NEW_TOKENS)), int(cfg.get("max_prompt_len", GRACE_MAX_PROMPT_LEN)))


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.float()
    return t[None] if t.dim() == 1 else t


def cos_sim(a, b) -> torch.Tensor:
    """Cosine similarity of every row of a [N, H] (or [H]) with every row of b → [N, M]."""
    a, b = _as_tensor(a), _as_tensor(b)
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def pairwise_cos_sim(a, b) -> torch.Tensor:
    """Cosine similarity of row i of a with row i of b → [N]."""
    a, b = _as_tensor(a), _as_tensor(b)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


class Encoder:
    """A GRACE model as a text encoder (sentence-transformers conventions).

    model_or_path: a checkpoint directory, an alias (tiny, qwen2.5-1.5b, ...), an HF id in the local
    cache, or an already loaded (model, tokenizer) pair. max_new_tokens / max_prompt_len default to
    the training run's values when the checkpoint sits in a run directory (its config.json), else the
    model's preset, else GRACE's evaluation limits (2048 / 1024).
    """

    def __init__(self, model_or_path, device: str = "auto", dtype: str = "auto", max_new_tokens: int | None = None,
                 max_prompt_len: int | None = None, max_tokens_per_microbatch: int = 16384):
        new_tokens, prompt_len = default_lengths(model_or_path if isinstance(model_or_path, str) else None)
        self.max_new_tokens = max_new_tokens or new_tokens
        self.max_prompt_len = max_prompt_len or prompt_len
        self.max_tokens_per_microbatch = max_tokens_per_microbatch
        if self.max_new_tokens < 1 or self.max_prompt_len < 1:
            raise ValueError(f"max_new_tokens and max_prompt_len must be ≥ 1, got {self.max_new_tokens}, "
                             f"{self.max_prompt_len}")
        if isinstance(model_or_path, (tuple, list)):
            self.model, self.tokenizer = model_or_path  # encode() switches to eval mode and back
            self.name = getattr(self.model, "name_or_path", "") or "model"
        else:
            from .models import load_model
            self.model, self.tokenizer = load_model(str(model_or_path), device, dtype, for_training=False)
            self.name = str(model_or_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_sentence_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def chat_prompts(self, texts: list[str]) -> list[ChatPrompt]:
        """Validate and template `texts`; warn once, with a count, about texts that had to be truncated."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str: Encoder.encode takes strings")
        prompts = [chat_prompt(self.tokenizer, t, self.max_prompt_len, allow_empty=True) for t in texts]
        n_cut = sum(p.truncated for p in prompts)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(texts)} texts were longer than max_prompt_len={self.max_prompt_len} "
                          f"tokens (chat template included) and were right-truncated", stacklevel=3)
        return prompts

    def encode(self, texts, batch_size: int = 32, normalize_embeddings: bool = True,
               show_progress_bar: bool | None = None, return_rationales: bool = False, rationale: str = "generate",
               max_new_tokens: int | None = None, temperature: float = 0.0, seed: int = 0,
               pooling: str = "text+rationale", convert_to_numpy: bool = True, convert_to_tensor: bool = False):
        """Embed a str → [H], or a list of str → [N, H] (numpy by default; a CPU tensor with
        convert_to_tensor=True). With return_rationales=True: (embeddings, rationale strings).

        rationale="generate" writes a rationale per text (greedy at temperature 0, else sampled with
        `seed`); "none" pools the prompt alone (the paper's "Base" column). pooling: "text+rationale" (GRACE's
        rule, the one training uses), "rationale" (the rationale's states alone) or "mix" (the text's mean and
        the rationale's mean, ½ each)."""
        if rationale not in RATIONALE_MODES:
            raise ValueError(f"rationale must be one of {RATIONALE_MODES}, got {rationale!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling != "text+rationale" and rationale == "none":
            raise ValueError(f"pooling={pooling!r} needs a rationale: rationale='none' pools the text alone")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        elif isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        texts = list(texts)
        if show_progress_bar is None:
            show_progress_bar = len(texts) > batch_size and sys.stderr.isatty()

        prompts = self.chat_prompts(texts)
        if prompts:
            emb, responses = embed_prompts(
                self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens or self.max_new_tokens,
                batch_size=batch_size, rationale=rationale == "generate", temperature=temperature, seed=seed,
                normalize=normalize_embeddings, max_tokens_per_microbatch=self.max_tokens_per_microbatch,
                progress=show_progress_bar, pooling=pooling)
        else:
            emb, responses = torch.empty(0, self.get_sentence_embedding_dimension()), []
        rationales = self.tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []

        if convert_to_tensor:
            out = emb
        elif convert_to_numpy:
            out = emb.numpy()
        else:
            out = list(emb)
        if single:
            out, rationales = out[0], rationales[0]
        return (out, rationales) if return_rationales else out

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix [N, M] (sentence-transformers' default similarity)."""
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity of corresponding rows → [N]."""
        return pairwise_cos_sim(embeddings1, embeddings2)

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, device={self.device}, max_new_tokens={self.max_new_tokens}, "
                f"max_prompt_len={self.max_prompt_len})")
