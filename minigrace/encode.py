"""Encode: texts → embeddings, each made from a rationale the model writes (GRACE at inference).

The pooling rule is exactly the training rule, applied to token ids (no decode/re-tokenize round
trip): mean of the last-layer hidden states from the first user-text token through the rationale's
EOS. Greedy decoding by default, so the same text always gives the same vector.
"""
from __future__ import annotations

import torch

from .embed import forward_rollouts
from .models import eos_token_ids
from .prompts import chat_prompt
from .rollout import Rollouts, generate, left_pad


def prompt_only_rollouts(prompts, pad_id: int, device) -> Rollouts:
    """Rollouts with an empty rationale: pool the text and assistant header only (the 'Base' embedding)."""
    ids, attention, pool_start = left_pad(prompts, pad_id, device)
    columns = torch.arange(ids.shape[1], device=device)
    pool_mask = (columns[None, :] >= pool_start[:, None]) & attention.bool()
    none = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    return Rollouts(ids, attention, torch.zeros_like(pool_mask), pool_mask, none,
                    torch.tensor([p.truncated for p in prompts], device=device), ids.shape[1])


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], *, max_new_tokens: int, max_prompt_len: int,
                batch_size: int = 64, rationale: bool = True, temperature: float = 0.0, seed: int = 0,
                max_tokens_per_microbatch: int = 16384, progress: bool = False
                ) -> tuple[torch.Tensor, list[str]]:
    """Embed `texts` → (embeddings [n, H] fp32 on CPU, unit norm; rationale strings)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    eos_ids, pad_id = eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    embeddings, rationales = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not progress, leave=False):
        prompts = [chat_prompt(tokenizer, t, max_prompt_len) for t in texts[start:start + batch_size]]
        if rationale:
            temps = torch.full((len(prompts),), float(temperature))
            rollouts = generate(model, prompts, temps, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                pad_id=pad_id, generator=generator)
            rationales += tokenizer.batch_decode(rollouts.responses(), skip_special_tokens=True)
        else:
            rollouts = prompt_only_rollouts(prompts, pad_id, model.device)
            rationales += [""] * len(prompts)
        embeddings.append(forward_rollouts(model, rollouts, max_tokens_per_microbatch, 1024, with_logprobs=False).embeddings.cpu())
    model.train(was_training)
    return torch.cat(embeddings), rationales
