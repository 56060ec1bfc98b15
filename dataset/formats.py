"""Record formats: one normaliser per shape people bring, each turning a record into danlu's canonical form.

Canonical records, by kind:

- ``pretrain``: ``{"text": str}``
- ``chat`` (SFT / LoRA / distillation): ``{"messages": [msg, ...], "tools"?: list, "meta": dict}``, or a document
  ``{"text": str, "meta": dict}`` (pretraining text replayed in a chat stage, trained on every token)
- ``dpo``: ``{"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...], "meta": dict}``
- ``rl`` (GRPO / PPO prompts): ``{"messages": [msg, ...] ending with the user's turn, "meta": dict}``

where ``msg`` is ``{"role": "system"|"user"|"assistant"|"tool", "content": str, "reasoning_content"?: str,
"tool_calls"?: list}`` and ``meta`` holds the record's other top-level keys untouched (evaluation files carry
fields such as "task" or "answer" there). The shape is detected per record, so files may mix shapes.

Every bad record raises ``DataError(path, line, reason)``; the readers can instead skip and count it. A record that
is usable but may teach the wrong thing (an empty answer, ...: ``suspect_reasons``) is read, and counted.
"""

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dataset.errors import DataError, SkipCounter, SuspectCounter
from dataset.mixing import plain_paths

KINDS = ("pretrain", "chat", "dpo", "rl")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> canonical roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
}


class _Invalid(Exception):
    """A record is unusable; carries the reason only. Turned into DataError where path and line are known."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(record: dict, key: str, expected: type | tuple[type, ...], what: str = "") -> Any:
    """record[key], checked to be present and of the expected type."""
    if key not in record:
        raise _Invalid(f"missing field '{key}'")
    value = record[key]
    if not isinstance(value, expected):
        raise _Invalid(f"field '{key}' must be {what or 'a string'}, got {_type_name(value)}")
    return value


def _meta(record: dict, consumed: tuple[str, ...]) -> dict:
    return {key: value for key, value in record.items() if key not in consumed}


def _json_list(value: Any, what: str) -> list:
    """A list, or a JSON string holding one (MiniMind stores tools and tool calls as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Invalid(f"{what} is a string but not valid JSON") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _Invalid(f"{what} must be a list of objects, got {_type_name(value)}")
    return value


# --- messages ----------------------------------------------------------------------------------------------

def _message(raw: Any, where: str) -> dict:
    """One role/content message (MiniMind and OpenAI shapes) -> canonical message."""
    if not isinstance(raw, dict):
        raise _Invalid(f"{where} must be an object, got {_type_name(raw)}")
    if "role" not in raw:
        raise _Invalid(f"{where} has no 'role'")
    role = raw["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise _Invalid(f"{where} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
    tool_calls = _json_list(raw["tool_calls"], f"{where} 'tool_calls'") if raw.get("tool_calls") else []
    if "content" not in raw:
        raise _Invalid(f"{where} has no 'content'")
    content = raw["content"]
    if content is None and tool_calls:  # OpenAI: an assistant turn that only calls tools has content null
        content = ""
    if not isinstance(content, str):
        raise _Invalid(f"{where} 'content' must be a string, got {_type_name(content)}")
    message = {"role": role, "content": content}
    reasoning = raw.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise _Invalid(f"{where} 'reasoning_content' must be a string, got {_type_name(reasoning)}")
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _messages(raw: Any, key: str) -> list[dict]:
    if not isinstance(raw, list):
        raise _Invalid(f"field '{key}' must be a list of messages, got {_type_name(raw)}")
    if not raw:
        raise _Invalid(f"empty conversation in '{key}'")
    return [_message(item, f"{key}[{i}]") for i, item in enumerate(raw)]


def _sharegpt_messages(raw: list) -> list[dict]:
    messages = []
    for i, item in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(item, dict):
            raise _Invalid(f"{where} must be an object, got {_type_name(item)}")
        if "from" not in item or "value" not in item:
            raise _Invalid(f"{where} needs 'from' and 'value' (ShareGPT) or 'role' and 'content'")
        speaker, value = item["from"], item["value"]
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            raise _Invalid(f"{where} has unknown role {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise _Invalid(f"{where} 'value' must be a string, got {_type_name(value)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _require_assistant(messages: list[dict], what: str = "conversation") -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid(f"{what} has no assistant turn")


# --- pretrain ----------------------------------------------------------------------------------------------

def normalise_pretrain(record: dict) -> dict:
    """{"text"} -> {"text"}; other keys are dropped (pretraining reads text only)."""
    if "text" not in record:
        raise _Invalid(f"missing field 'text' (keys seen: {sorted(record)})")
    text = _field(record, "text", str)
    if not text.strip():
        raise _Invalid("empty text")
    return {"text": text}


# --- chat --------------------------------------------------------------------------------------------------

def _chat_from_conversations(record: dict) -> dict:
    """MiniMind {"conversations": [{"role","content",...}]} or ShareGPT {"conversations": [{"from","value"}]}."""
    raw = _field(record, "conversations", list, "a list of messages")
    if not raw:
        raise _Invalid("empty conversation in 'conversations'")
    consumed = ("conversations", "tools")
    if isinstance(raw[0], dict) and "from" in raw[0] and "role" not in raw[0]:
        messages = _sharegpt_messages(raw)
        system = record.get("system")  # LLaMA-Factory's ShareGPT puts the system prompt beside the turns
        if isinstance(system, str) and system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        consumed += ("system",) if isinstance(system, str) else ()
    else:
        messages = _messages(raw, "conversations")
    return _chat(messages, record, consumed)


def _chat_from_messages(record: dict) -> dict:
    """OpenAI {"messages": [{"role","content",...}], "tools"?}."""
    return _chat(_messages(record["messages"], "messages"), record, ("messages", "tools"))


def _chat_from_alpaca(record: dict) -> dict:
    """Alpaca {"instruction","input"?,"output","system"?,"history"?: [[user, assistant], ...]}."""
    instruction = _field(record, "instruction", str)
    extra_input = _field(record, "input", str) if "input" in record else ""
    output = _field(record, "output", str)
    system = _field(record, "system", str) if record.get("system") is not None else ""
    history = _field(record, "history", list, "a list of pairs") if record.get("history") is not None else []
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise _Invalid(f"history[{i}] must be a [user, assistant] pair of strings, got {_type_name(turn)}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    user = f"{instruction}\n{extra_input}" if extra_input else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _chat(messages, record, ("instruction", "input", "output", "system", "history"))


def _chat(messages: list[dict], record: dict, consumed: tuple[str, ...]) -> dict:
    _require_assistant(messages)
    chat: dict = {"messages": messages}
    tools = _json_list(record["tools"], "field 'tools'") if record.get("tools") else []
    if tools:
        chat["tools"] = tools
    chat["meta"] = _meta(record, consumed)
    return chat


def normalise_chat(record: dict) -> dict:
    """Any chat shape (MiniMind, OpenAI, ShareGPT, Alpaca) -> {"messages", "tools"?, "meta"}. A preference pair (any
    DPO shape) is its chosen conversation: SFT on the chosen answers, e.g. to replay DPO's data in a later stage.
    Pretraining text ({"text"}) stays a document, {"text", "meta"}, trained on every token (dataset/chat.py's
    record_segments): a chat stage replays pretraining this way."""
    if "conversations" in record:
        return _chat_from_conversations(record)
    if "messages" in record:
        return _chat_from_messages(record)
    if "instruction" in record:
        return _chat_from_alpaca(record)
    if "chosen" in record or "response_chosen" in record:
        pair = normalise_dpo(record)
        return {"messages": pair["prompt"] + pair["chosen"], "meta": pair["meta"]}
    if "text" in record:
        return {"text": normalise_pretrain(record)["text"], "meta": _meta(record, ("text",))}
    raise _Invalid(
        f"unknown chat record shape (keys seen: {sorted(record)}); expected 'conversations' (MiniMind or "
        "ShareGPT), 'messages' (OpenAI), 'instruction'/'input'/'output' (Alpaca), a preference pair ('chosen') or "
        "pretraining text ('text')"
    )


# --- DPO ---------------------------------------------------------------------------------------------------

def _split_at_last_user(messages: list[dict], key: str) -> tuple[list[dict], list[dict]]:
    """(messages up to and including the last user turn, the assistant continuation after it)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise _Invalid(f"'{key}' has no user turn")
    prompt, continuation = messages[: last_user + 1], messages[last_user + 1 :]
    _require_assistant(continuation, f"'{key}' after the last user turn")
    return prompt, continuation


def _continuation(value: Any, key: str) -> list[dict]:
    """A response given as a string or as a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, key)
    _require_assistant(messages, f"'{key}'")
    return messages


def _dpo_from_pairs(record: dict) -> dict:
    """MiniMind {"chosen": [msgs], "rejected": [msgs]}, both including the same prompt."""
    chosen = _messages(_field(record, "chosen", list, "a list of messages"), "chosen")
    rejected = _messages(_field(record, "rejected", list, "a list of messages"), "rejected")
    prompt, chosen_reply = _split_at_last_user(chosen, "chosen")
    rejected_prompt, rejected_reply = _split_at_last_user(rejected, "rejected")
    if rejected_prompt != prompt:
        raise _Invalid("'chosen' and 'rejected' have different prompts")
    return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply,
            "meta": _meta(record, ("chosen", "rejected"))}


def _dpo_from_prompt(record: dict) -> dict:
    """{"prompt", "chosen", "rejected"}: each a string or a list of messages."""
    raw_prompt = _field(record, "prompt", (str, list), "a string or a list of messages")
    if isinstance(raw_prompt, str):
        if not raw_prompt.strip():
            raise _Invalid("field 'prompt' is empty")
        prompt = [{"role": "user", "content": raw_prompt}]
    else:
        prompt = _messages(raw_prompt, "prompt")
    chosen = _continuation(_field(record, "chosen", (str, list), "a string or a list of messages"), "chosen")
    rejected = _continuation(_field(record, "rejected", (str, list), "a string or a list of messages"), "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "meta": _meta(record, ("prompt", "chosen", "rejected"))}


def _dpo_from_question(record: dict) -> dict:
    """{"question", "response_chosen", "response_rejected"}, all strings."""
    question = _field(record, "question", str)
    if not question.strip():
        raise _Invalid("field 'question' is empty")
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": _field(record, "response_chosen", str)}],
        "rejected": [{"role": "assistant", "content": _field(record, "response_rejected", str)}],
        "meta": _meta(record, ("question", "response_chosen", "response_rejected")),
    }


def normalise_dpo(record: dict) -> dict:
    """Any preference-pair shape -> {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs], "meta"}."""
    if "question" in record or "response_chosen" in record or "response_rejected" in record:
        return _dpo_from_question(record)
    if "prompt" in record:
        return _dpo_from_prompt(record)
    if "chosen" in record or "rejected" in record:
        return _dpo_from_pairs(record)
    raise _Invalid(
        f"unknown DPO record shape (keys seen: {sorted(record)}); expected 'chosen'/'rejected' message lists, "
        "'prompt'/'chosen'/'rejected' or 'question'/'response_chosen'/'response_rejected'"
    )


# --- RL prompts --------------------------------------------------------------------------------------------

def normalise_rl(record: dict) -> dict:
    """An RL prompt -> {"messages": [...up to the last user turn], "meta"}: {"prompt": str or [msgs], "task"?,
    "answer"?, ...}, or a chat record (MiniMind, OpenAI, ShareGPT) cut after its last user turn (MiniMind's RL
    files end with an empty assistant turn; an evaluation file's reference answer is dropped). "meta" keeps the
    other keys (task, answer, label, ...): the reward functions of evals/ read them."""
    if "prompt" in record:
        raw = _field(record, "prompt", (str, list), "a string or a list of messages")
        if isinstance(raw, str) and not raw.strip():
            raise _Invalid("field 'prompt' is empty")
        messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")
        consumed: tuple[str, ...] = ("prompt",)
    elif "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        raw = _field(record, key, list, "a list of messages")
        if raw and isinstance(raw[0], dict) and "from" in raw[0] and "role" not in raw[0]:
            messages = _sharegpt_messages(raw)
        else:
            messages = _messages(raw, key)
        consumed = (key,)
    else:
        raise _Invalid(f"unknown RL prompt shape (keys seen: {sorted(record)}); expected 'prompt' (a string or "
                       "messages) or a chat record ('conversations' / 'messages') whose last turn is the user's")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise _Invalid("the prompt has no user turn")
    return {"messages": messages[: last_user + 1], "meta": _meta(record, consumed)}


NORMALISERS: dict[str, Callable[[dict], dict]] = {
    "pretrain": normalise_pretrain,
    "chat": normalise_chat,
    "dpo": normalise_dpo,
    "rl": normalise_rl,
}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what a JSON "\\ud800" escape without its pair decodes to


def has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a decoded JSON value holds a lone UTF-16 surrogate (no tokenizer can encode one).
    A loop, not recursion: any depth json.loads accepts is walked."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# Why a usable record may teach the wrong thing or nothing. It is read and trained on (real datasets, MiniMind's
# among them, hold a few of these: refusing them would stop the run), and the data summary counts them by reason.
EMPTY_ANSWER = "an assistant turn with no content"
NO_USER = "no user turn"
SAME_PAIR = "chosen equals rejected"
EMPTY_CHOSEN = "an empty chosen answer"
NUL = "a NUL character in the text"


def _blank(text: str) -> bool:
    return not text or text.isspace()  # isspace stops at the first other character; strip() would copy the text


def _has_nul(messages: list[dict]) -> bool:
    return any("\0" in m["content"] or "\0" in m.get("reasoning_content", "") for m in messages)


def _empty_answer(messages: list[dict]) -> bool:
    """An assistant turn that says nothing: empty or blank content and no tool calls (a turn that only calls a tool
    is a normal tool-call turn)."""
    return any(m["role"] == "assistant" and _blank(m["content"]) and not m.get("tool_calls") for m in messages)


def suspect_reasons(record: dict, kind: str) -> list[str]:
    """The reasons a canonical record of `kind` (what `normalise` returns) may teach the wrong thing or nothing; []
    for most. Cheap: one pass over the message texts, no copies (the readers run it over gigabytes)."""
    if "text" in record:  # pretraining text, or a document in chat data
        return [NUL] if "\0" in record["text"] else []
    reasons = []
    if kind == "dpo":
        prompt, chosen = record["prompt"], record["chosen"]
        if not any(m["role"] == "user" for m in prompt):
            reasons.append(NO_USER)
        if chosen == record["rejected"]:
            reasons.append(SAME_PAIR)
        if _empty_answer(chosen):
            reasons.append(EMPTY_CHOSEN)
        if _has_nul(prompt) or _has_nul(chosen) or _has_nul(record["rejected"]):
            reasons.append(NUL)
        return reasons
    messages = record["messages"]
    if kind == "chat":
        if _empty_answer(messages):
            reasons.append(EMPTY_ANSWER)
        if not any(m["role"] == "user" for m in messages):
            reasons.append(NO_USER)
    if _has_nul(messages):
        reasons.append(NUL)
    return reasons


def normalise(record: Any, kind: str, path: str = "<record>", lineno: int = 0) -> dict:
    """One decoded JSON value -> canonical record of `kind`; raises DataError(path, lineno, reason) if unusable."""
    if kind not in NORMALISERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    try:
        if not isinstance(record, dict):
            raise _Invalid(f"record must be a JSON object, got {_type_name(record)}")
        canonical = NORMALISERS[kind](record)
        if has_lone_surrogate(canonical):
            raise _Invalid("a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) is not text")
        return canonical
    except _Invalid as err:
        raise DataError(path, lineno, str(err)) from None


def parse_line(raw: bytes, kind: str, path: str, lineno: int) -> dict:
    """One non-blank JSONL line (bytes) -> canonical record; DataError for bad UTF-8, bad JSON or a bad record."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, lineno, f"not valid UTF-8 (byte {err.start})") from None
    try:
        # Without the line end, a line cut short reads "Unterminated string", not "Invalid control character".
        value = json.loads(text.lstrip("\ufeff").rstrip())
    except json.JSONDecodeError as err:
        hint = "; a .json file holds one JSON array of records, or one record per line" if path.endswith(".json") \
            else ""
        raise DataError(path, lineno, f"invalid JSON: {err.msg} (column {err.colno}){hint}") from None
    except RecursionError:
        raise DataError(path, lineno, "invalid JSON: nested too deeply") from None
    return normalise(value, kind, path, lineno)


def parse_record(payload: Any, kind: str, path: str, line: int, where: str = "") -> dict:
    """One payload of raw_records -> canonical record; DataError(path, line, where + reason) if unusable."""
    try:
        if isinstance(payload, bytes):
            return parse_line(payload, kind, path, line)
        return normalise(payload, kind, path, line)
    except DataError as err:
        if not where:
            raise
        raise DataError(path, line, where + err.reason) from None


# --- readers -----------------------------------------------------------------------------------------------

def is_json_array(path: str) -> bool:
    """Whether a file holds one JSON array (rather than JSON lines)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def file_format(path: str) -> str:
    """How a file is read: "parquet" (by suffix), "json" (a .json file holding one array), else "jsonl"."""
    if path.endswith(".parquet"):
        return "parquet"
    return "json" if path.endswith(".json") and is_json_array(path) else "jsonl"


def _jsonl_lines(path: str) -> Iterator[tuple[int, str, bytes]]:
    """(line number, "", raw bytes) of every non-blank line, read lazily: a 10 GB file is never held in memory."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, "", raw


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_items(path: str) -> Iterator[tuple[int, str, Any]]:
    """(line where the element starts, "record N: ", decoded element) of a JSON array file.

    The file is read whole (JSON arrays cannot be streamed; use JSON lines for files larger than memory) and
    decoded element by element, so every record is named by its line. A syntax error ends the read even with
    --skip_bad: nothing after it can be found reliably.
    """
    raw = Path(path).read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = bom + err.start
        raise DataError(path, raw.count(b"\n", 0, at) + 1, f"not valid UTF-8 (byte {at})") from None
    decoder = json.JSONDecoder()

    def syntax_error(reason: str, at: int) -> DataError:
        return DataError(path, text.count("\n", 0, at) + 1, f"invalid JSON: {reason}; the array cannot be read "
                                                              "past this point (JSON lines can skip a bad line)")

    pos = _SPACE.match(text, _SPACE.match(text).end() + 1).end()  # past "[" (is_json_array checked it is there)
    line, counted_to, number = 1, 0, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise syntax_error(f"{err.msg} (column {err.colno})", err.pos) from None
            except RecursionError:
                raise syntax_error("nested too deeply", pos) from None
            number += 1
            yield line, f"record {number}: ", value
            pos = _SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise syntax_error(f"expected ',' or ']' after record {number}", pos)
    if _SPACE.match(text, pos).end() != len(text):
        raise DataError(path, text.count("\n", 0, pos) + 1, "invalid JSON: extra data after the array")


def _parquet_rows(path: str) -> Iterator[tuple[int, str, dict]]:
    """(0, "record N: ", row as a dict) of a parquet file, a batch of rows at a time."""
    import pyarrow.parquet as pq  # only parquet users pay for the import

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield 0, f"record {number}: ", row
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid and ArrowIOError derive from these
        raise DataError(path, 0, f"not a readable parquet file ({err})") from None


def raw_records(path: str) -> Iterator[tuple[int, str, Any]]:
    """Every record of one file, in order, not yet normalised: (line, where, payload).

    payload is a JSONL line's raw bytes (.jsonl, and .json files that hold JSON lines) or the decoded element of
    a JSON array or row of a parquet file; `line` is the line the record starts on (0 for parquet) and `where`
    prefixes reasons about it ("record N: " in arrays and parquet, else ""). parse_record turns a payload into a
    canonical record. Raises DataError for a file that is missing, unreadable, not decodable or has no records.
    """
    if not Path(path).is_file():
        raise DataError(path, 0, "no such file" if not Path(path).exists() else "not a file")
    try:
        reader, empty = {
            "parquet": (_parquet_rows, "no rows"),
            "json": (_json_array_items, "empty JSON array: no records"),
            "jsonl": (_jsonl_lines, "empty file: no records"),
        }[file_format(path)]
        seen_any = False
        for record in reader(path):
            seen_any = True
            yield record
    except OSError as err:  # permissions, a file vanishing mid-read
        raise DataError(path, 0, f"cannot read: {err.strerror or err}") from None
    if not seen_any:
        raise DataError(path, 0, empty)


def iter_records(
    path: str, kind: str, skip_bad: bool = False, skipped: SkipCounter | None = None,
    suspect: SuspectCounter | None = None,
) -> Iterator[dict]:
    """Stream canonical records of `kind` from a file (.jsonl, .json array, .parquet) or comma-separated files.

    A bad record raises DataError(file, line, reason); with skip_bad it is counted in `skipped` and passed
    over. A missing, unreadable or empty file always raises. In JSON arrays the line is where the record starts
    and the reason begins "record N: "; parquet rows are named by that prefix alone. With `suspect` (an
    errors.SuspectCounter), each record's suspect_reasons are counted there; the record is yielded all the same.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    for file in plain_paths(path):
        for line, where, payload in raw_records(file):
            try:
                record = parse_record(payload, kind, file, line, where)
            except DataError as err:
                if not skip_bad:
                    raise
                if skipped is not None:
                    skipped.add(err)
                continue
            if suspect is not None:
                suspect.add_record(file, line, [where + reason for reason in suspect_reasons(record, kind)])
            yield record


def load_records(
    path: str, kind: str, skip_bad: bool = False, skipped: SkipCounter | None = None,
    suspect: SuspectCounter | None = None,
) -> list[dict]:
    """All canonical records of `path` in a list (see iter_records)."""
    return list(iter_records(path, kind, skip_bad, skipped, suspect))
