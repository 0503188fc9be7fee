"""Prompts: the one system prompt, chat templating, and where pooling starts.

GRACE wraps every text (query, document, negative, or plain text) in the same chat:

    <system> SYSTEM_PROMPT </system> <user> text </user> <assistant> rationale

The embedding is the mean of the last-layer hidden states over everything *after* the system
prompt: the user text, the assistant header and the rationale (EOS included). `pool_start` is the
index of the first token of the user text in the templated prompt, computed from the tokenizer's
own offsets so it is exact for any chat template.
"""
from __future__ import annotations

from dataclasses import dataclass

# The only copy of the prompt. GRACE uses the same string for every side and at evaluation.
SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within "
    "<think></think> tags. Finally, generate a comprehensive understanding of this text."
)


@dataclass
class ChatPrompt:
    ids: list[int]  # token ids of the templated prompt, ending with the assistant header
    pool_start: int  # index of the first user-text token: pooling covers ids[pool_start:] + rationale
    truncated: bool  # the user text was cut to fit max_prompt_len


def render_chat(tokenizer, text: str) -> str:
    """The chat-templated prompt as a string, ready for the assistant's reply."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _user_span(tokenizer, text: str) -> tuple[list[int], int]:
    """Token ids of the templated prompt and the index of the first token of `text` in them."""
    rendered = render_chat(tokenizer, text)
    # The user text sits after the system prompt; search from there so a text that repeats the
    # system prompt cannot confuse us.
    char_start = rendered.index(text, rendered.index(SYSTEM_PROMPT) + len(SYSTEM_PROMPT))
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # First token that ends after the user text begins (the token may begin with a separator).
    pool_start = next(i for i, (_, end) in enumerate(offsets) if end > char_start)
    return ids, pool_start


def chat_prompt(tokenizer, text: str, max_prompt_len: int) -> ChatPrompt:
    """Template `text`, right-truncating the text (never the template) to `max_prompt_len` tokens."""
    if not text:
        raise ValueError("cannot build a prompt for an empty text")
    ids, pool_start = _user_span(tokenizer, text)
    if len(ids) <= max_prompt_len:
        return ChatPrompt(ids, pool_start, truncated=False)
    template_len = len(ids) - len(tokenizer(text, add_special_tokens=False)["input_ids"])
    budget = max_prompt_len - template_len
    if budget < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for text after the template")
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Decoding a cut may re-tokenize to a slightly different length: shrink until it fits.
    while budget > 0:
        cut = tokenizer.decode(text_ids[:budget]).strip()
        if cut:
            ids, pool_start = _user_span(tokenizer, cut)
            if len(ids) <= max_prompt_len:
                return ChatPrompt(ids, pool_start, truncated=True)
        budget -= 1
    raise ValueError(f"could not fit any of the text into max_prompt_len={max_prompt_len}")
