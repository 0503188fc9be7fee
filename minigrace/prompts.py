"""Prompts: the one system prompt, chat templating, and where pooling starts.

GRACE wraps every text (query, document, negative, or plain text) in the same chat:

    <system> SYSTEM_PROMPT </system> <user> text </user> <assistant> rationale

The embedding is the mean of the last-layer hidden states over everything *after* the system
prompt: the user text, the assistant header and the rationale (EOS included). `pool_start` is the
index of the first token of the user text in the templated prompt.

Where the text starts is read from the template itself, not by searching for the text: the chat is
rendered once with a sentinel in place of the text, which splits it into the part before the text
and the part after. This holds for templates that rewrite the text (Llama-3.x strips it with
`| trim`) and for the empty text (the pool then starts where the text would be). The tokenizer's
own offsets then give the first token that reaches past the part before the text.
"""
from __future__ import annotations

from dataclasses import dataclass

# The only copy of the prompt. GRACE uses the same string for every side and at evaluation.
SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within "
    "<think></think> tags. Finally, generate a comprehensive understanding of this text."
)

# Templates that print today's date (Llama-3.x: "Today Date: ...") get this one instead, so a text's
# prompt, and so its embedding, is the same every day. It is the Llama-3.x templates' own fallback.
CHAT_DATE = "26 Jul 2024"

# Stands in for the user text when rendering the template around it (no whitespace: survives `trim`).
_SENTINEL = "MINIGRACE_USER_TEXT_SENTINEL_7f3a9c"


@dataclass
class ChatPrompt:
    ids: list[int]  # token ids of the templated prompt, ending with the assistant header
    pool_start: int  # index of the first user-text token: pooling covers ids[pool_start:] + rationale
    truncated: bool  # the user text was cut to fit max_prompt_len


def render_chat(tokenizer, text: str) -> str:
    """The chat-templated prompt as a string, ready for the assistant's reply."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         date_string=CHAT_DATE)


def _around_text(tokenizer) -> tuple[str, str]:
    """(before, after): the rendered chat before and after the user text, whatever the text."""
    rendered = render_chat(tokenizer, _SENTINEL)
    if rendered.count(_SENTINEL) != 1:
        raise ValueError(f"the chat template shows the user message {rendered.count(_SENTINEL)} times, not once: "
                         f"cannot tell where the text starts")
    before, after = rendered.split(_SENTINEL)
    return before, after


def _user_span(tokenizer, text: str) -> tuple[list[int], int, str]:
    """(token ids of the templated prompt, index of the first user-text token, the text as the
    template wrote it: `text`, or `text.strip()` for templates that trim)."""
    before, after = _around_text(tokenizer)
    rendered = render_chat(tokenizer, text)
    if not (rendered.startswith(before) and rendered.endswith(after) and len(rendered) >= len(before) + len(after)):
        raise ValueError(f"the chat template renders the chat around the text differently for {text[:40]!r} "
                         f"than for other texts: cannot tell where the text starts")
    shown = rendered[len(before):len(rendered) - len(after)]
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # The first token that ends past the part before the text: the text's first token (it may begin
    # with the template's separator when the tokenizer merges them), or, for an empty text, the
    # token after it (the end-of-turn marker).
    pool_start = next(i for i, (_, end) in enumerate(offsets) if end > len(before))
    return ids, pool_start, shown


def chat_prompt(tokenizer, text: str, max_prompt_len: int, allow_empty: bool = False) -> ChatPrompt:
    """Template `text`, right-truncating the text (never the template) to `max_prompt_len` tokens.

    An empty text raises (training data never has one) unless allow_empty=True: then the prompt is
    the empty user turn and the pool starts where the text would be (the Encoder embeds "" so)."""
    if not text and not allow_empty:
        raise ValueError("cannot build a prompt for an empty text")
    ids, pool_start, shown = _user_span(tokenizer, text)
    if len(ids) <= max_prompt_len:
        return ChatPrompt(ids, pool_start, truncated=False)
    text_ends = [end for _, end in tokenizer(shown, add_special_tokens=False, return_offsets_mapping=True)
                 ["offset_mapping"]]
    budget = max_prompt_len - (len(ids) - len(text_ends))
    if budget < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for text after the template")
    # Cut the text at a token boundary (an exact prefix of it, no decode round trip); the cut may
    # tokenize differently inside the template: shrink until it fits.
    while budget > 0:
        ids, pool_start, cut = _user_span(tokenizer, shown[:text_ends[budget - 1]])
        if cut and len(ids) <= max_prompt_len:
            return ChatPrompt(ids, pool_start, truncated=True)
        budget -= 1
    raise ValueError(f"could not fit any of the text into max_prompt_len={max_prompt_len}")
