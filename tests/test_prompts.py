"""prompts.py: the pooling span starts exactly at the first user-text token, for our tiny template and
for the real templates of GRACE's backbones (one trims the text, one prints a date); truncation keeps
the template."""
import copy

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


# -----------------------------------------------------------------------------
# The real chat templates of GRACE's backbones, applied to the tiny tokenizer

BACKBONE_TEXTS = ["  leading and trailing spaces  ", "\n\ttabs and newlines\n\n", "   ", "x",
                  "日本語のテキスト — naïve café ☕", ""]


def backbone_tokenizer(tok, name):
    """A copy of the tiny tokenizer with a backbone's chat template and special tokens."""
    tok = copy.deepcopy(tok)
    tok.chat_template = BACKBONE_TEMPLATES[name]
    if name == "llama3.2":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return tok


def expected_render(name, text):
    """(before the text, the text as the template writes it, after it), written out by hand."""
    if name == "llama3.2":  # trims the text; prints a date
        return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                f"Today Date: 26 Jul 2024\n\n{SYSTEM_PROMPT}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                text.strip(), "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # Qwen2.5-Instruct and Qwen3-Instruct-2507 (ChatML; our system prompt replaces Qwen2.5's default one)
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n", text,
            "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2", "qwen3-2507"])
def test_real_templates_pool_from_the_first_user_text_token(tiny, name):
    tok = backbone_tokenizer(tiny[1], name)
    for text in BACKBONE_TEXTS:
        before, shown, after = expected_render(name, text)
        rendered = render_chat(tok, text)
        assert rendered == before + shown + after
        p = chat_prompt(tok, text, 512, allow_empty=True)
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        assert p.ids == enc["input_ids"] and not p.truncated
        # The pool starts at the first token that reaches past the template's part before the text ...
        ends = [end for _, end in enc["offset_mapping"]]
        assert ends[p.pool_start - 1] <= len(before) < ends[p.pool_start], (name, text)
        # ... so nothing of the text is left out, and nothing of the system turn is pooled but,
        # at most, a separator the tokenizer merged into the text's first token.
        head = tok.decode(p.ids[:p.pool_start])
        assert before.startswith(head) and not before[len(head):].strip()
        assert tok.decode(p.ids[p.pool_start:]) == before[len(head):] + shown + after
        if not shown:  # empty (or trimmed to empty): the pool starts at the end-of-turn marker
            assert after.startswith(tok.convert_ids_to_tokens(p.ids[p.pool_start]))


def test_templates_that_print_the_date_get_a_fixed_one(tiny):
    """Llama-3.x prints today's date: without a fixed date_string the same text would get another
    prompt (and embedding) tomorrow."""
    tok = backbone_tokenizer(tiny[1], "llama3.2")
    assert "\nToday Date: 26 Jul 2024\n" in render_chat(tok, "x")


def test_truncation_with_a_trimming_template(tiny):
    tok = backbone_tokenizer(tiny[1], "llama3.2")
    long_text = "\n  " + " ".join(["observatory quasar orbit"] * 100) + "  \n"
    full = chat_prompt(tok, long_text, 10_000)
    limit = full.pool_start + 30
    cut = chat_prompt(tok, long_text, limit)
    assert not full.truncated and cut.truncated and limit - 3 <= len(cut.ids) <= limit
    assert cut.pool_start == full.pool_start and cut.ids[:cut.pool_start] == full.ids[:full.pool_start]
    assert tok.decode(cut.ids[cut.pool_start:]).startswith("observatory quasar orbit observatory")
    assert tok.decode(cut.ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_empty_text_only_with_allow_empty(tiny):
    """Training never sees "" (it raises); the Encoder embeds it as the empty user turn."""
    _, tok = tiny
    with pytest.raises(ValueError, match="empty"):
        chat_prompt(tok, "", 100)
    p = chat_prompt(tok, "", 100, allow_empty=True)
    assert p.ids == tok(render_chat(tok, ""), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(p.ids[p.pool_start]) == "<|im_end|>"
    assert p.pool_start == chat_prompt(tok, "quasar", 100).pool_start  # where the text would be


# Verbatim `chat_template`s (jinja source). Qwen2.5-Instruct (all sizes) and Llama-3.2-Instruct: read
# from the models' GGUF metadata (Qwen/Qwen2.5-0.5B-Instruct-GGUF, bartowski/Llama-3.2-1B-Instruct-GGUF);
# Qwen3-Instruct-2507: as unsloth's chat_templates.py ships it ("qwen3-instruct").
BACKBONE_TEMPLATES = {}

BACKBONE_TEMPLATES["qwen2.5"] = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

BACKBONE_TEMPLATES["llama3.2"] = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

BACKBONE_TEMPLATES["qwen3-2507"] = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if reasoning_content %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
