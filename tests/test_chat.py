"""The ChatML template and the SFT assistant-only loss mask."""

import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from dataset.chat import CHAT_TEMPLATE, render_chat, tokenize_chat
from dataset.tokenizer import load_tokenizer

MINIMIND_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询城市天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

SINGLE = [
    {"role": "user", "content": "用一句话介绍一下长城。"},
    {"role": "assistant", "content": "长城是中国古代的军事防御工程。"},
]
MULTI = [
    {"role": "system", "content": "你是一个简洁的助手。"},
    {"role": "user", "content": "三加五等于几？"},
    {"role": "assistant", "content": "等于八。"},
    {"role": "user", "content": "再乘以二呢？"},
    {"role": "assistant", "content": "八乘以二等于十六。"},
]
REASONING = [
    {"role": "user", "content": "天空为什么是蓝色的？"},
    {"role": "assistant", "content": "因为蓝光散射更强。", "reasoning_content": "瑞利散射，波长短的光散射强。"},
]
TOOL_CALLS = [
    {"role": "system", "content": "你可以查询天气。"},
    {"role": "user", "content": "北京和上海今天天气怎么样？"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}},
        ],
    },
    {"role": "tool", "content": "晴，25度"},
    {"role": "tool", "content": "小雨，18度"},
    {"role": "assistant", "content": "北京晴天25度，上海小雨18度。"},
]

# What the model must learn to write in each conversation, in order: exactly the masked text.
ASSISTANT_TEXTS = {
    "single": ["长城是中国古代的军事防御工程。<|im_end|>"],
    "multi": ["等于八。<|im_end|>", "八乘以二等于十六。<|im_end|>"],
    "reasoning": ["<think>\n瑞利散射，波长短的光散射强。\n</think>\n\n因为蓝光散射更强。<|im_end|>"],
    "tool_calls": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>',
        "北京晴天25度，上海小雨18度。<|im_end|>",
    ],
}
CONVERSATIONS = {
    "single": (SINGLE, None),
    "multi": (MULTI, None),
    "reasoning": (REASONING, None),
    "tool_calls": (TOOL_CALLS, TOOLS),
}

# More shapes for the renderer-equals-transformers check.
EXTRA = [
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\n想\n</think>\n\n好", "reasoning_content": "ignored"},
        ],
        None,
    ),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "reasoning_content": ""}], None),
    (
        [
            {"role": "user", "content": "天气？"},
            {
                "role": "assistant",
                "content": "我查一下。",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "杭州"}}],
            },
            {"role": "tool", "content": "阴"},
        ],
        TOOLS,
    ),
    ([{"role": "tool", "content": "first"}, {"role": "user", "content": "then"}], None),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}], TOOLS),
    ([{"role": "user", "content": None}], None),
]


@pytest.fixture(scope="module")
def ours(tokenizer_dir) -> PreTrainedTokenizerFast:
    """The tokenizer train_tokenizer.py trains on the test corpus (conftest), loaded as the stages load it."""
    return load_tokenizer(tokenizer_dir)


def tokenizers(ours: PreTrainedTokenizerFast) -> list[PreTrainedTokenizerFast]:
    """Our tokenizer, and MiniMind's when the shared fixture is present (its template swapped for ours)."""
    found = [ours]
    if MINIMIND_DIR.is_dir():
        minimind = load_tokenizer(MINIMIND_DIR)
        minimind.chat_template = CHAT_TEMPLATE
        found.append(minimind)
    return found


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of assistant bodies up to and including <|im_end|>, found by parsing the text."""
    return [(m.start(1), m.end(1)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]


def test_render_golden_strings():
    assert render_chat(SINGLE) == (
        "<|im_start|>user\n用一句话介绍一下长城。<|im_end|>\n<|im_start|>assistant\n长城是中国古代的军事防御工程。<|im_end|>\n"
    )
    assert render_chat(SINGLE[:1], add_generation_prompt=True) == (
        "<|im_start|>user\n用一句话介绍一下长城。<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(MULTI).startswith("<|im_start|>system\n你是一个简洁的助手。<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>assistant\n<think>\n瑞利散射，波长短的光散射强。\n</think>\n\n因为" in render_chat(REASONING)
    rendered = render_chat(TOOL_CALLS, TOOLS)
    assert rendered.startswith("<|im_start|>system\n你可以查询天气。\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气"' in rendered
    assert rendered.count("<|im_start|>system") == 1
    assert (
        "<|im_start|>user\n<tool_response>\n晴，25度\n</tool_response>\n<tool_response>\n小雨，18度\n"
        "</tool_response><|im_end|>\n"
    ) in rendered


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers_apply_chat_template(ours, add_generation_prompt):
    cases = list(CONVERSATIONS.values()) + EXTRA + [(messages, TOOLS) for messages, _ in CONVERSATIONS.values()]
    for tokenizer in tokenizers(ours):
        for messages, tools in cases:
            expected = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert render_chat(messages, tools, add_generation_prompt) == expected, (messages, tools)


def test_no_default_system_prompt():
    assert render_chat(SINGLE).startswith("<|im_start|>user\n")
    assert "system" not in render_chat(SINGLE)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_segments_tokenize_like_the_whole_string(ours, name):
    messages, tools = CONVERSATIONS[name]
    for tokenizer in tokenizers(ours):
        input_ids, _ = tokenize_chat(tokenizer, messages, tools)
        assert input_ids == tokenizer(render_chat(messages, tools), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mask_token_by_token(ours, name):
    messages, tools = CONVERSATIONS[name]
    text = render_chat(messages, tools)
    spans = assistant_spans(text)
    for tokenizer in tokenizers(ours):
        input_ids, mask = tokenize_chat(tokenizer, messages, tools)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert input_ids == encoding["input_ids"] and len(mask) == len(input_ids)
        for token_id, is_output, (start, end) in zip(input_ids, mask, encoding["offset_mapping"]):
            inside = any(span_start <= start and end <= span_end for span_start, span_end in spans)
            assert is_output == int(inside), (tokenizer.convert_ids_to_tokens(token_id), text[start:end])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_masked_tokens_decode_to_assistant_texts(ours, name):
    messages, tools = CONVERSATIONS[name]
    for tokenizer in tokenizers(ours):
        input_ids, mask = tokenize_chat(tokenizer, messages, tools)
        runs, current = [], []
        for token_id, is_output in zip(input_ids, mask):
            if is_output:
                current.append(token_id)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        assert [tokenizer.decode(run) for run in runs] == ASSISTANT_TEXTS[name]
        assert all(run[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") for run in runs)
        # Each run is preceded by the unmasked header and followed by an unmasked "\n".
        header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        for index in (i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]):
            assert input_ids[index - len(header) : index] == header
        assert mask[-1] == 0 and tokenizer.decode(input_ids[-1:]) == "\n"


def test_user_system_and_tool_turns_are_never_trained(ours):
    input_ids, mask = tokenize_chat(ours, TOOL_CALLS, TOOLS)
    unmasked = ours.decode([t for t, m in zip(input_ids, mask) if not m])
    for turn in TOOL_CALLS:
        if turn["role"] != "assistant":
            assert turn["content"] in unmasked
    masked = ours.decode([t for t, m in zip(input_ids, mask) if m])
    assert "晴，25度" not in masked and "北京和上海" not in masked and "# Tools" not in masked


def test_truncation(ours):
    full_ids, full_mask = tokenize_chat(ours, MULTI)
    for max_len in (1, 10, len(full_ids) - 1, len(full_ids), len(full_ids) + 5):
        input_ids, mask = tokenize_chat(ours, MULTI, max_len=max_len)
        assert input_ids == full_ids[:max_len] and mask == full_mask[:max_len]
        assert len(input_ids) == min(max_len, len(full_ids))
