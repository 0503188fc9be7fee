"""Rollout: sample rationales for a batch of chat prompts with a KV cache.

All prompts of a step (G copies of each main prompt at temperature 1.0, one query and one negative
prompt at 0.5) go through one batched generation with a per-row temperature. Prompts are
left-padded to a common width P, so every response starts at column P:

    ids  = [pad pad <prompt tokens> | r1 r2 ... EOS pad pad]
           <------- P columns ------> <-- max_new_tokens -->

The result carries every mask the later stages need, so no stage re-tokenizes or decodes.
A row leaves the decode batch at its EOS. For encoding, generate_pooled also runs the prompts' shared
system prompt once per batch and returns the mean pooled states collected while decoding.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from .loss import fp32_logits
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


def shared_prefix_length(prompts: list[ChatPrompt]) -> int:
    """How many leading tokens every prompt shares before its pooled span (the system prompt, in GRACE's chat)."""
    limit = min(min(p.pool_start for p in prompts), min(len(p.ids) for p in prompts) - 1)
    first = prompts[0].ids
    n = 0
    while n < limit and all(p.ids[n] == first[n] for p in prompts):
        n += 1
    return n


@contextlib.contextmanager
def fp32_lm_head(head: torch.nn.Module):
    """Within it, `head` (the lm_head linear) projects in fp32 with autocast off, as the loss does
    (loss.fp32_logits): sampling and the PPO ratio read the same fp32 logits. Under bf16 autocast the
    head's own matmul would round them to bf16 (a step of 0.125 at |logit| 16..32). The head's own
    (autocast) matmul is handed zero positions, so the logits are computed once."""
    kept = []

    def keep_input(module, args):  # the hidden states [n, k, H]: kept; the head projects none of them
        kept.append(args[0])
        return (args[0][..., :0, :],)

    def fp32_output(module, args, output):  # replaces the head's empty output [n, 0, V] with [n, k, V] fp32
        return fp32_logits(kept.pop(), module.weight, module.bias)

    hooks = [head.register_forward_pre_hook(keep_input), head.register_forward_hook(fp32_output)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class KVDecoder:
    """One batch's KV cache, extended a token at a time. Every forward returns the next-token logits [n, V] fp32
    (or None) and, with `hidden=True`, the last-layer hidden states (after the final norm) of the fed tokens.

    Rows are laid out as [shared prefix | left padding | rest of the prompt | generated tokens]; positions
    count real tokens only (position_ids), so the layout changes no value, only how much is computed."""

    def __init__(self, model, hidden: bool):
        self.model, self.hidden = model, hidden
        hf_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        hf_model = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model  # peft's wrapped one
        self.cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        self.lm_head = hf_model.get_output_embeddings()  # its logits come out fp32 (fp32_lm_head)
        self.cache = None
        self.attention = None  # [n, C] long: 1 on the real tokens of the C cached columns
        self.next_position = None  # [n]: the position the next fed token takes

    def forward(self, ids: torch.Tensor, position: torch.Tensor, logits: bool, model=None):
        keep = 1 if logits else torch.zeros(0, dtype=torch.long, device=ids.device)  # empty: no lm_head at all
        past = {} if self.cache is None else {self.cache_arg: self.cache}
        with fp32_lm_head(self.lm_head) if logits else contextlib.nullcontext():
            out = (model or self.model)(input_ids=ids, attention_mask=self.attention, position_ids=position,
                                        use_cache=True, output_hidden_states=self.hidden, logits_to_keep=keep, **past)
        self.cache = _cache(out)
        return (out.logits[:, -1] if logits else None), (out.hidden_states[-1] if self.hidden else None)

    def feed(self, ids: torch.Tensor, attention: torch.Tensor, position: torch.Tensor, logits: bool, model=None):
        """Forward ids [n, W] (attention [n, W]: 1 on real tokens; position [n, W]) after what is cached
        (through `model` instead of the decoder's own when given)."""
        self.attention = attention if self.attention is None else torch.cat([self.attention, attention], 1)
        return self.forward(ids, position, logits, model)

    def prefill_prefix(self, prefix: torch.Tensor, n: int, model=None) -> None:
        """Run the tokens every row starts with (prefix [S]) once, on one row, and copy their cache to n rows.
        model: run the prefix through this module instead (the unwrapped model under DDP, where the wrapper
        allows one forward per backward; the copies keep the prefix's autograd graph)."""
        ids, position = prefix[None], torch.arange(len(prefix), device=prefix.device)[None]
        self.feed(ids, torch.ones_like(ids), position, logits=False, model=model)
        self.cache.batch_repeat_interleave(n)
        self.attention = self.attention.expand(n, -1)

    def prefill(self, prompts: list[ChatPrompt], pad_id: int, prefix_len: int = 0):
        """Forward the prompts. The first prefix_len tokens (the same in every row) are run once, on one row,
        and their cache copied to every row. → logits [n, V], hidden [n, W, H] of the other prompt tokens (or
        None), and their attention [n, W] and pool_start [n] (the rest of each prompt, left-padded to width W)."""
        n, device = len(prompts), self.model.device
        if prefix_len:
            self.prefill_prefix(torch.tensor(prompts[0].ids[:prefix_len], device=device), n)
        rest = [ChatPrompt(p.ids[prefix_len:], p.pool_start - prefix_len, p.truncated) for p in prompts]
        ids, attention, pool_start = left_pad(rest, pad_id, device)  # [n, W]
        full = attention if not prefix_len else torch.cat([self.attention, attention], 1)
        position = position_ids(full)[:, -ids.shape[1]:]
        self.next_position = position[:, -1] + 1
        logits, hidden = self.feed(ids, attention, position, logits=True)
        return logits, hidden, attention, pool_start

    def step(self, token: torch.Tensor, real: torch.Tensor, logits: bool = True):
        """Feed one token per row [n] (real [n] bool: attended to, else padding) → (logits [n, V] or None,
        hidden [n, H] or None)."""
        logits, hidden = self.feed(token[:, None], real.long()[:, None], self.next_position[:, None], logits)
        self.next_position = self.next_position + 1
        return logits, (hidden[:, -1] if hidden is not None else None)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows where keep [n] is False from the batch (their cache too)."""
        self.cache.batch_select_indices(keep.nonzero().squeeze(-1))
        self.attention, self.next_position = self.attention[keep], self.next_position[keep]


@torch.no_grad()
def generate(model, prompts: list[ChatPrompt], temperature: torch.Tensor, *, max_new_tokens: int,
             eos_ids: list[int], pad_id: int, top_p: float = 1.0, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None, share_prefix: bool = False, drop_finished: bool = True) -> Rollouts:
    """Sample one rationale per prompt (repeat a prompt in `prompts` to get a group).

    noise [N, max_new_tokens] in [0, 1): row i's t-th token is drawn with noise[i, t] (see sample_next);
    drawn from `generator` when not given. Same noise row → same rationale, whatever the batch.
    share_prefix: run the prompts' common leading tokens once (see KVDecoder.prefill). drop_finished: a row
    leaves the decode batch at its EOS (else it is fed padding until every row is done). Neither changes
    a token beyond floating-point noise."""
    return sample(model, prompts, temperature, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                  top_p=top_p, generator=generator, noise=noise, share_prefix=share_prefix,
                  drop_finished=drop_finished)[0]


# How generate_pooled averages the states (inference only; training always uses GRACE's rule):
#   text+rationale  GRACE's rule: one mean over every pooled token, user text + header + rationale + EOS
#   rationale       the rationale's tokens (EOS included) alone
#   mix             mean(text part) and mean(rationale part) weighted ½ each, whatever their lengths
POOLINGS = ("text+rationale", "rationale", "mix")


@torch.no_grad()
def generate_pooled(model, prompts: list[ChatPrompt], temperature: torch.Tensor, *, max_new_tokens: int,
                    eos_ids: list[int], pad_id: int, top_p: float = 1.0, noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, pooling: str = "text+rationale",
                    share_prefix: bool = True) -> tuple[Rollouts, torch.Tensor]:
    """generate, plus each rollout's pooled last-layer hidden state [N, H] fp32, collected while generating:
    the prefill gives the prompt tokens' states, each decode step the fed token's, and one last step feeds
    the final tokens. With GRACE's pooling (text+rationale) the same numbers as a second forward over
    prompt + rationale (embed.forward_rollouts) up to floating-point noise, without that forward.
    max_new_tokens=0 pools the prompt alone (text+rationale pooling only). share_prefix: see generate."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling != "text+rationale" and max_new_tokens == 0:
        raise ValueError(f"pooling={pooling!r} needs a rationale (max_new_tokens ≥ 1)")
    rollouts, (text_sum, text_count, rationale_sum, rationale_count) = sample(
        model, prompts, temperature, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, top_p=top_p,
        generator=generator, noise=noise, share_prefix=share_prefix, drop_finished=True, pool=True)
    if pooling == "text+rationale":
        return rollouts, (text_sum + rationale_sum) / (text_count + rationale_count).clamp(min=1)[:, None]
    rationale_mean = rationale_sum / rationale_count.clamp(min=1)[:, None]
    if pooling == "rationale":
        return rollouts, rationale_mean
    return rollouts, 0.5 * (text_sum / text_count.clamp(min=1)[:, None] + rationale_mean)


def sample(model, prompts: list[ChatPrompt], temperature: torch.Tensor, *, max_new_tokens: int, eos_ids: list[int],
           pad_id: int, top_p: float, generator, noise, share_prefix: bool, drop_finished: bool, pool: bool = False
           ) -> tuple[Rollouts, tuple | None]:
    """The decode loop behind generate and generate_pooled → (Rollouts, None), or with pool=True (Rollouts,
    (text_sum [N, H], text_count [N], rationale_sum [N, H], rationale_count [N])): fp32 sums of the last-layer
    states over the prompt's pooled tokens and over the rationale's (EOS included)."""
    device, n = model.device, len(prompts)
    if noise is None:
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.rand(n, max_new_tokens, generator=generator, device=gen_device)
    noise, temperature, eos = noise.to(device), temperature.to(device), torch.tensor(eos_ids, device=device)
    decoder = KVDecoder(model, hidden=pool)
    logits, hidden, attention, pool_start = decoder.prefill(prompts, pad_id, shared_prefix_length(prompts)
                                                            if share_prefix else 0)
    if pool:  # the prompt's pooled tokens: from pool_start on, real tokens only
        columns = torch.arange(attention.shape[1], device=device)
        in_pool = (columns[None, :] >= pool_start[:, None]) & attention.bool()  # [N, W]
        text_sum = torch.einsum("nwh,nw->nh", hidden.float(), in_pool.float())  # [N, H]
        text_count = in_pool.sum(-1).float()  # [N]
        rationale_sum = torch.zeros_like(text_sum)  # [N, H]

    response = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [N, R]
    alive = torch.zeros(n, max_new_tokens, dtype=torch.bool, device=device)  # the token belongs to the response
    rows = torch.arange(n, device=device)  # the decode batch's rows
    running = torch.ones(n, dtype=torch.bool, device=device)  # [len(rows)]: no EOS yet
    steps = 0
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature[rows], top_p, noise[rows, t])
        token = torch.where(running, token, torch.full_like(token, pad_id))
        response[rows, t], alive[rows, t] = token, running
        running = running & ~torch.isin(token, eos)
        steps = t + 1
        last = t == max_new_tokens - 1 or not running.any()
        if last and not pool:
            break
        # Feed the token: its logits give the next token, its hidden state (EOS included) is pooled.
        logits, hidden = decoder.step(token, alive[rows, t], logits=not last)
        if pool:
            rationale_sum[rows] += torch.where(alive[rows, t, None], hidden.float(), 0.0)
        if last:
            break
        if drop_finished and not running.all():
            decoder.keep_rows(running)
            rows, running, logits = rows[running], running[running], logits[running]

    response, alive = response[:, :steps], alive[:, :steps]
    ended = (alive & torch.isin(response, eos)).any(-1)
    ids, prompt_attention, full_pool_start = left_pad(prompts, pad_id, device)
    truncated = ~ended if max_new_tokens else torch.zeros_like(ended)  # no EOS within max_new_tokens
    rollouts = pack_rollouts(prompts, ids, prompt_attention, full_pool_start, response, alive, truncated)
    if not pool:
        return rollouts, None
    return rollouts, (text_sum, text_count, rationale_sum, alive.sum(-1).float())


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
