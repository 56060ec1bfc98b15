"""The chat template (ChatML, as MiniMind and Qwen use it) and the assistant-only loss mask for SFT.

The template exists twice: as a Jinja string that goes into tokenizer_config.json, so that
`tokenizer.apply_chat_template` and anything else that reads Hugging Face tokenizers renders our chats,
and as `chat_segments` in Python, which also says which pieces of the text are assistant output.
Tests check that both render the same string.
"""

import json

from transformers import PreTrainedTokenizerFast

# load_tokenizer and save_tokenizer are re-exported for callers that still import them from here.
from dataset.tokenizer import ENDOFTEXT, IM_END, IM_START, load_tokenizer, save_tokenizer  # noqa: F401

# The label of a position that is not trained on: what torch's cross_entropy (and transformers) ignore by default.
# tokenize_chat's mask is 0 there; the datasets put IGNORE_INDEX in the labels.
IGNORE_INDEX = -100

# Qwen's wording for the tool section of the system turn, so models and tools trained on it feel at home.
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)

CHAT_TEMPLATE = r"""{%- set system_first = messages and messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if system_first %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        '\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- set turns = messages[1:] if tools and system_first else messages %}
{%- for message in turns %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'assistant' %}
        {%- if message.reasoning_content and '<think>' not in content %}
            {%- set content = '<think>\n' + message.reasoning_content + '\n</think>\n\n' + content %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' + content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {%- set call = tool_call.function if tool_call.function else tool_call %}
            {%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' + arguments + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""


def _text(value: object) -> str:
    """Message content as the template sees it: a string, or empty for anything else (None, content parts)."""
    return value if isinstance(value, str) else ""


def _assistant_body(message: dict) -> str:
    """What the assistant said: optional <think> block, the answer, then its tool calls."""
    content = _text(message.get("content"))
    reasoning = message.get("reasoning_content")
    if reasoning and "<think>" not in content:
        content = f"<think>\n{reasoning}\n</think>\n\n{content}"
    body = content
    for index, tool_call in enumerate(message.get("tool_calls") or []):
        if content or index:
            body += "\n"
        call = tool_call.get("function") or tool_call
        arguments = call["arguments"]
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        body += f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>'
    return body


def chat_segments(
    messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_assistant_output) pieces; joined, they are exactly `render_chat`.

    An assistant turn is three pieces: the `<|im_start|>assistant\\n` header (not output), the body up to
    and including `<|im_end|>` (output: the model must learn to write it and to stop), and the `\\n` after
    it (not output). Every piece boundary sits next to a special token or a newline, so tokenizing the
    pieces one by one gives the same tokens as tokenizing the whole string (except for an assistant
    answer that itself starts with a newline, where the pieces give what the model sees at inference).
    """
    segments: list[tuple[str, bool]] = []
    turns = messages
    if tools:
        system = ""
        if messages and messages[0]["role"] == "system":
            system, turns = messages[0]["content"] + "\n\n", messages[1:]
        signatures = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        segments.append((f"{IM_START}system\n{system}{TOOLS_INTRO}{signatures}{TOOLS_OUTRO}{IM_END}\n", False))
    for index, message in enumerate(turns):
        role, content = message["role"], _text(message.get("content"))
        if role == "assistant":
            segments += [(f"{IM_START}assistant\n", False), (_assistant_body(message) + IM_END, True), ("\n", False)]
        elif role == "tool":
            # Consecutive tool results share one user turn, as in Qwen.
            opens = index == 0 or turns[index - 1]["role"] != "tool"
            closes = index == len(turns) - 1 or turns[index + 1]["role"] != "tool"
            text = f"\n<tool_response>\n{content}\n</tool_response>"
            segments.append(((f"{IM_START}user" if opens else "") + text + (f"{IM_END}\n" if closes else ""), False))
        else:
            segments.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


def render_chat(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The chat as text: the string `tokenizer.apply_chat_template(..., tokenize=False)` gives with CHAT_TEMPLATE."""
    return "".join(text for text, _ in chat_segments(messages, tools, add_generation_prompt))


def document_segments(text: str) -> list[tuple[str, bool]]:
    """Pretraining text in a chat stage's data (a {"text"} record): `<|endoftext|>text<|endoftext|>`, the text and
    its closing `<|endoftext|>` trained on, as pretraining and the news perplexity (evals/perplexity.py) see a
    document. Mixed into SFT by weight, it keeps the language model the chats would otherwise overwrite."""
    return [(ENDOFTEXT, False), (text + ENDOFTEXT, True)]


def record_segments(record: dict) -> list[tuple[str, bool]]:
    """A canonical chat record (dataset/formats.py) as (text, is_trained_on) pieces: a conversation's chat_segments,
    or a document's document_segments."""
    if "text" in record:
        return document_segments(record["text"])
    return chat_segments(record["messages"], record.get("tools"))


def tokenize_chat(
    tokenizer: PreTrainedTokenizerFast, messages: list[dict], tools: list | None = None, max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and the SFT loss mask: 1 on every assistant turn's body and its `<|im_end|>`.

    System, user and tool turns and the `<|im_start|>assistant\\n` headers get 0, so the model is trained to
    answer, not to predict the prompt. Both lists are cut to max_len when given.
    """
    return tokenize_segments(tokenizer, chat_segments(messages, tools), max_len)


def tokenize_segments(
    tokenizer: PreTrainedTokenizerFast, segments: list[tuple[str, bool]], max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the pieces one after the other, and their mask (1 on the tokens of trained-on pieces)."""
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    mask: list[int] = []
    for (_, is_output), piece in zip(segments, pieces):
        input_ids += piece
        mask += [int(is_output)] * len(piece)
    if max_len is not None:
        input_ids, mask = input_ids[:max_len], mask[:max_len]
    return input_ids, mask

