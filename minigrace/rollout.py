"""Rollout: sample rationales for a batch of chat prompts with a KV cache.

All prompts of a step (G copies of each main prompt at temperature 1.0, one query and one negative
prompt at 0.5) go through one batched generation with a per-row temperature. Prompts are
left-padded to a common width P, so every response starts at column P:

    ids  = [pad pad <prompt tokens> | r1 r2 ... EOS pad pad]
           <------- P columns ------> <-- max_new_tokens -->

The result carries every mask the later stages need, so no stage re-tokenizes or decodes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .prompts import ChatPrompt


@dataclass
class Rollouts:
    ids: torch.Tensor  # [N, L] long: left-padded prompt | right-padded response
    attention: torch.Tensor  # [N, L] long: 1 on real tokens (prompt and response up to EOS)
    response_mask: torch.Tensor  # [N, L] bool: generated tokens, the first EOS included
    pool_mask: torch.Tensor  # [N, L] bool: first user-text token .. end of response (the embedding span)
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    prompt_truncated: torch.Tensor  # [N] bool: the input text was cut to fit max_prompt_len
    prompt_width: int  # P: responses start at this column

    @property
    def response_lengths(self) -> torch.Tensor:  # [N]
        return self.response_mask.sum(-1)

    def position_ids(self) -> torch.Tensor:  # [N, L]
        return position_ids(self.attention)

    def rows(self, index) -> "Rollouts":
        """A sub-batch (e.g. a micro-batch or the main rollouts only)."""
        return Rollouts(self.ids[index], self.attention[index], self.response_mask[index],
                        self.pool_mask[index], self.truncated[index], self.prompt_truncated[index],
                        self.prompt_width)

    def responses(self) -> list[list[int]]:
        """The generated token ids of each row, EOS included."""
        return [row[mask].tolist() for row, mask in zip(self.ids, self.response_mask)]


def position_ids(attention: torch.Tensor) -> torch.Tensor:
    """[N, L]: 0 at each row's first real token, counting real tokens only (the one rule for left and
    right padding, prefill, decoding and every later forward)."""
    return (attention.cumsum(-1) - 1).clamp(min=0)


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists padded to one width: ids [N, W] and attention [N, W] (1 on real tokens)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attention[row, span] = 1
    return ids, attention


def left_pad(prompts: list[ChatPrompt], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack prompts right-aligned. Returns ids [N, P], attention [N, P], pool_start [N] (column index)."""
    ids, attention = pad_rows([p.ids for p in prompts], pad_id, left=True)
    pool_start = torch.tensor([ids.shape[1] - len(p.ids) + p.pool_start for p in prompts], dtype=torch.long)
    return ids.to(device), attention.to(device), pool_start.to(device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a rationale: the tokenizer's EOS and the generation config's EOS list."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling. logits [N, V]; temperature [N] (0 = greedy);
    uniform [N] in [0, 1): each row's own random number, so a row's token does not depend on the
    other rows of the batch (the same rollout on 1 or N data-parallel ranks) → [N]."""
    greedy = logits.argmax(-1)
    scaled = logits.float() / temperature.clamp(min=1e-5)[:, None]
    probs = scaled.softmax(-1)
    if top_p < 1.0:
        # Nucleus: keep the smallest set of tokens whose mass reaches top_p (the top token always).
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)  # [N, V]; right=True never lands on a zero-probability token
    target = (uniform.to(cdf.device) * cdf[:, -1])[:, None]
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return torch.where(temperature > 0, sampled, greedy)


def _cache(out):
    """The KV cache of a forward's output: `cache` in recent transformers, `past_key_values` before."""
    return out["cache"] if "cache" in out else out.past_key_values


@torch.no_grad()
def generate(model, prompts: list[ChatPrompt], temperature: torch.Tensor, *, max_new_tokens: int,
             eos_ids: list[int], pad_id: int, top_p: float = 1.0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Rollouts:
    """Sample one rationale per prompt (repeat a prompt in `prompts` to get a group).

    noise [N, max_new_tokens] in [0, 1): row i's t-th token is drawn with noise[i, t] (see sample_next);
    drawn from `generator` when not given. Same noise row → same rationale, whatever the batch."""
    device = model.device
    if noise is None:
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.rand(len(prompts), max_new_tokens, generator=generator, device=gen_device)
    ids, attention, pool_start = left_pad(prompts, pad_id, device)  # [N, P]
    n, width = ids.shape
    temperature = temperature.to(device)
    eos = torch.tensor(eos_ids, device=device)
    position = position_ids(attention)
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the wrapped model
    cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    # Prefill the prompts, then decode one token at a time from the cache.
    out = model(input_ids=ids, attention_mask=attention, position_ids=position, use_cache=True, logits_to_keep=1)
    cache, logits = _cache(out), out.logits[:, -1]
    next_position = position[:, -1] + 1
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    new_tokens, alive_masks = [], []
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, noise[:, t])
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        alive_masks.append(~finished)  # this token belongs to the response (EOS included)
        new_tokens.append(token)
        finished = finished | torch.isin(token, eos)
        if finished.all():
            break
        attention = torch.cat([attention, (~finished).long()[:, None]], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position[:, None],
                    use_cache=True, **{cache_arg: cache})
        cache, logits = _cache(out), out.logits[:, -1]
        next_position = next_position + 1

    response = torch.stack(new_tokens, dim=1)  # [N, R]
    response_alive = torch.stack(alive_masks, dim=1)  # [N, R]
    return pack_rollouts(prompts, ids, attention[:, :width], pool_start, response, response_alive, ~finished)


def pack_rollouts(prompts: list[ChatPrompt], ids: torch.Tensor, prompt_attention: torch.Tensor,
                  pool_start: torch.Tensor, response: torch.Tensor, response_alive: torch.Tensor,
                  truncated: torch.Tensor) -> Rollouts:
    """Left-padded prompts ids/attention [N, P] + right-padded responses [N, R] (alive: the token
    belongs to the response, EOS included) → Rollouts. Every rollout backend ends here."""
    device = ids.device
    full_ids = torch.cat([ids, response], dim=1)  # [N, P+R]
    full_attention = torch.cat([prompt_attention, response_alive.long()], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_attention, dtype=torch.bool), response_alive], dim=1)
    columns = torch.arange(full_ids.shape[1], device=device)
    pool_mask = (columns[None, :] >= pool_start[:, None]) & full_attention.bool()
    return Rollouts(
        ids=full_ids, attention=full_attention, response_mask=response_mask, pool_mask=pool_mask,
        truncated=truncated, prompt_truncated=torch.tensor([p.truncated for p in prompts], device=device),
        prompt_width=ids.shape[1],
    )


def prompt_only_rollouts(prompts: list[ChatPrompt], pad_id: int, device) -> Rollouts:
    """Rollouts with an empty rationale: pool the text and the assistant header only (the paper's 'Base')."""
    ids, attention, pool_start = left_pad(prompts, pad_id, device)
    empty = torch.zeros(len(prompts), 0, dtype=torch.long, device=device)
    return pack_rollouts(prompts, ids, attention, pool_start, empty, empty.bool(),
                         torch.zeros(len(prompts), dtype=torch.bool, device=device))


def cat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Rollouts of separate generations as one batch: prompts re-left-padded to the widest prompt,
    responses right-padded to the longest response (positions follow from `attention`, so nothing moves)."""
    width = max(r.prompt_width for r in parts)  # P
    longest = max(r.ids.shape[1] - r.prompt_width for r in parts)  # R

    def fit(t: torch.Tensor, r: Rollouts, fill) -> torch.Tensor:  # [n, P_r + R_r] → [n, P + R]
        pad = (width - r.prompt_width, longest - (t.shape[1] - r.prompt_width))
        return torch.nn.functional.pad(t.long(), pad, value=int(fill)).to(t.dtype)

    return Rollouts(
        ids=torch.cat([fit(r.ids, r, pad_id) for r in parts]),
        attention=torch.cat([fit(r.attention, r, 0) for r in parts]),
        response_mask=torch.cat([fit(r.response_mask, r, False) for r in parts]),
        pool_mask=torch.cat([fit(r.pool_mask, r, False) for r in parts]),
        truncated=torch.cat([r.truncated for r in parts]),
        prompt_truncated=torch.cat([r.prompt_truncated for r in parts]),
        prompt_width=width,
    )
