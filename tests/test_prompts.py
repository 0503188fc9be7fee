"""prompts.py: the pooling span starts exactly at the first user-text token; truncation keeps the template."""
import pytest

from minigrace.prompts import SYSTEM_PROMPT, chat_prompt, render_chat


def test_pool_start_excludes_exactly_the_system_prompt(tiny):
    _, tok = tiny
    text = "a short guide to telescopes and comets"
    p = chat_prompt(tok, text, max_prompt_len=256)
    # Everything before pool_start is the templated system turn + the user header ...
    before = tok.decode(p.ids[:p.pool_start])
    assert SYSTEM_PROMPT in before and before.endswith("user\n") and "guide" not in before
    # ... and the pooled span starts with the user text, then the assistant header.
    after = tok.decode(p.ids[p.pool_start:])
    assert after.lstrip().startswith(text)
    assert after.rstrip().endswith("assistant")
    # The prefix is the same for every text (one system prompt), so pool_start is constant.
    assert chat_prompt(tok, "quasar", 256).pool_start == p.pool_start
    assert p.ids == tok(render_chat(tok, text), add_special_tokens=False)["input_ids"]


def test_text_containing_the_system_prompt_is_not_confused(tiny):
    _, tok = tiny
    text = SYSTEM_PROMPT + " and more"
    p = chat_prompt(tok, text, 256)
    assert tok.decode(p.ids[p.pool_start:]).lstrip().startswith(SYSTEM_PROMPT)
    assert p.pool_start == chat_prompt(tok, "x", 256).pool_start


def test_truncation_cuts_the_text_not_the_template(tiny):
    _, tok = tiny
    long_text = " ".join(["observatory quasar orbit"] * 100)
    full = chat_prompt(tok, long_text, 10_000)
    assert not full.truncated
    cut = chat_prompt(tok, long_text, 80)
    assert cut.truncated and len(cut.ids) <= 80
    assert cut.ids[:cut.pool_start] == full.ids[:full.pool_start]
    assert tok.decode(cut.ids[-3:]).strip().endswith("assistant")
    with pytest.raises(ValueError, match="no room"):
        chat_prompt(tok, long_text, 5)
    with pytest.raises(ValueError, match="empty"):
        chat_prompt(tok, "", 100)
