"""Record formats: every shape normalises to canonical form, every bad record fails with file:line: reason."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataset.errors import DataError, SkipCounter, SuspectCounter
from dataset.formats import iter_records, load_records, normalise, suspect_reasons

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "formats"


def write_jsonl(path: Path, lines: list) -> str:
    """Lines given as objects are JSON-encoded; strings and bytes are written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            else:
                f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)).encode() + b"\n")
    return str(path)


# --- fixtures ----------------------------------------------------------------------------------------------

FIXTURE_KINDS = {
    "pretrain_text.jsonl": "pretrain",
    "sft_conversations.jsonl": "chat",
    "sft_alpaca.jsonl": "chat",
    "sft_sharegpt.jsonl": "chat",
    "reason_think_answer.jsonl": "chat",
    "dpo_messages.jsonl": "dpo",
    "dpo_prompt_chosen_rejected.jsonl": "dpo",
    "dpo_question_response.jsonl": "dpo",
}


def test_every_fixture_file_is_known():
    if not FIXTURES.is_dir():
        pytest.skip("shared fixtures absent")
    assert {p.name for p in FIXTURES.glob("*.jsonl")} <= set(FIXTURE_KINDS)


@pytest.mark.parametrize("name,kind", sorted(FIXTURE_KINDS.items()))
def test_fixture_loads_as_its_kind(name, kind):
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip("shared fixtures absent")
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    records = load_records(str(path), kind)
    assert len(records) == n_lines
    for record in records:
        if kind == "pretrain":
            assert record["text"]
        elif kind == "chat":
            assert any(m["role"] == "assistant" for m in record["messages"])
        else:
            assert record["prompt"][-1]["role"] == "user"
            assert record["chosen"][0]["role"] == record["rejected"][0]["role"] == "assistant"
            assert record["chosen"] != record["rejected"]


# --- chat shapes -------------------------------------------------------------------------------------------

def test_minimind_conversations_keep_reasoning_tools_and_meta():
    record = {
        "conversations": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "add"},
        ],
        "tools": json.dumps([{"name": "calc"}]),
        "task": "math",
        "answer": "4",
    }
    chat = normalise(record, "chat")
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
    ]
    assert chat["tools"] == [{"name": "calc"}]
    assert chat["meta"] == {"task": "math", "answer": "4"}


def test_openai_tool_call_turn_with_null_content():
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}
    record = {"messages": [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "noon"},
    ]}
    messages = normalise(record, "chat")["messages"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]


def test_sharegpt_roles_and_system_field():
    record = {"system": "sys", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
              "id": 7}
    assert normalise(record, "chat") == {
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "yo"}],
        "meta": {"id": 7},
    }


def test_alpaca_with_input_system_and_history():
    record = {"instruction": "translate", "input": "你好", "output": "hello", "system": "s",
              "history": [["q1", "a1"]]}
    assert normalise(record, "chat")["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "translate\n你好"},
        {"role": "assistant", "content": "hello"},
    ]
    assert normalise({"instruction": "list fruit", "input": "", "output": "apple"}, "chat")["messages"][0] == {
        "role": "user", "content": "list fruit"}


# --- DPO shapes --------------------------------------------------------------------------------------------

def test_dpo_message_pairs_split_at_last_user_turn():
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c"}]
    record = {"chosen": prompt + [{"role": "assistant", "content": "good"}],
              "rejected": prompt + [{"role": "assistant", "content": "bad"}]}
    assert normalise(record, "dpo") == {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "meta": {},
    }


@pytest.mark.parametrize("name", ["dpo_messages.jsonl", "dpo_prompt_chosen_rejected.jsonl",
                                  "dpo_question_response.jsonl"])
def test_preference_pairs_read_as_chats_of_their_chosen_answers(name):
    """Replaying DPO's data in a later stage: every DPO shape read as chat data is its prompt plus chosen reply."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip("shared fixtures absent")
    pairs, chats = load_records(str(path), "dpo"), load_records(str(path), "chat")
    assert len(chats) == len(pairs) > 0
    for pair, chat in zip(pairs, chats):
        assert chat["messages"] == pair["prompt"] + pair["chosen"]
        assert not any(m == pair["rejected"][-1] for m in chat["messages"])


def test_pretraining_text_read_as_chat_data_is_a_document():
    """Replaying pretraining in a chat stage: a {"text"} record stays text (its other keys in meta); empty is bad."""
    assert normalise({"text": "人民日报消息。", "source": "news"}, "chat") == {"text": "人民日报消息。",
                                                                             "meta": {"source": "news"}}
    with pytest.raises(DataError, match="empty text"):
        normalise({"text": "  "}, "chat", "a.jsonl", 3)
    with pytest.raises(DataError, match="pretraining text"):  # the shapes the error lists include it
        normalise({"txt": "x"}, "chat")


def test_dpo_pairs_with_different_prompts_are_rejected():
    record = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
              "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match="different prompts"):
        normalise(record, "dpo")


def test_dpo_prompt_strings_and_message_lists_agree():
    as_strings = normalise({"prompt": "q", "chosen": "good", "rejected": "bad"}, "dpo")
    as_lists = normalise({"prompt": [{"role": "user", "content": "q"}],
                          "chosen": [{"role": "assistant", "content": "good"}],
                          "rejected": [{"role": "assistant", "content": "bad"}]}, "dpo")
    as_question = normalise({"question": "q", "response_chosen": "good", "response_rejected": "bad"}, "dpo")
    assert as_strings == as_lists == as_question


# --- errors ------------------------------------------------------------------------------------------------

BAD_LINES = [
    ("pretrain", '{"text": ', "invalid JSON"),
    ("pretrain", "[1, 2]", "record must be a JSON object, got list"),
    ("pretrain", {"text": 123}, "field 'text' must be a string, got int"),
    ("pretrain", {"body": "x"}, "missing field 'text' (keys seen: ['body'])"),
    ("pretrain", {"text": "  "}, "empty text"),
    ("chat", {"dialog": [], "id": 1}, "unknown chat record shape (keys seen: ['dialog', 'id'])"),
    ("chat", {"conversations": []}, "empty conversation"),
    ("chat", {"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
    ("chat", {"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
    ("chat", {"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
    ("chat", {"conversations": [{"from": "alien", "value": "hi"}]}, "unknown role 'alien'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "conversation has no assistant turn"),
    ("chat", {"instruction": "x", "input": ""}, "missing field 'output'"),
    ("dpo", {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "missing field 'rejected'"),
    ("dpo", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ("dpo", {"foo": 1}, "unknown DPO record shape (keys seen: ['foo'])"),
]


@pytest.mark.parametrize("kind,line,reason", BAD_LINES)
def test_bad_line_names_file_line_and_reason(tmp_path, kind, line, reason):
    good = {"pretrain": {"text": "ok"}, "chat": {"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]},
            "dpo": {"prompt": "q", "chosen": "a", "rejected": "b"}}[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    assert (info.value.path, info.value.line) == (path, 3)  # blank line 2 still counts
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}:3: ")


def test_non_utf8_line_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "ok"}, b'{"text": "\xff\xfe"}'])
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid UTF-8"):
        load_records(path, "pretrain")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty file: no records") as info:
        load_records(str(empty), "pretrain", skip_bad=True)
    assert info.value.line == 0
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"), "pretrain")


def test_skip_bad_counts_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": 1}, "{oops", {"text": 2}, {"text": "b"}])
    skipped = SkipCounter()
    records = load_records(path, "pretrain", skip_bad=True, skipped=skipped)
    assert [r["text"] for r in records] == ["a", "b"]
    assert skipped.total == 3
    assert skipped.by_reason["field 'text' must be a string, got int"] == 2


def test_bom_json_array_parquet_and_comma_separated_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n')
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "two"}, {"text": "three"}]))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "four"}]), parquet)
    texts = [r["text"] for r in iter_records(f"{jsonl}, {array},{parquet}", "pretrain")]
    assert texts == ["one", "two", "three", "four"]

    array.write_text(json.dumps([{"text": "ok"}, {"text": 5}], indent=2))  # record 2 starts on line 5
    with pytest.raises(DataError, match=r"b.json:5: record 2: field 'text' must be a string"):
        load_records(str(array), "pretrain")


# --- records that are read, but counted: they may teach the wrong thing --------------------------------------

USER, ANSWER = {"role": "user", "content": "好评还是差评？"}, {"role": "assistant", "content": "好评"}
TOOL_TURN = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
SUSPECT = [  # (kind, raw record, its reasons)
    ("chat", {"conversations": [USER, ANSWER]}, []),
    ("chat", {"messages": [USER, TOOL_TURN, {"role": "tool", "content": "1"}, ANSWER]}, []),  # a tool-call turn
    ("chat", {"conversations": [USER, {"role": "assistant", "content": "", "tool_calls": "[{\"name\": \"f\"}]"},
                                {"role": "tool", "content": "1"}, ANSWER]}, []),  # MiniMind's: tool calls as text
    ("chat", {"conversations": [USER, {**ANSWER, "content": ""}]}, ["an assistant turn with no content"]),
    ("chat", {"messages": [USER, {**ANSWER, "content": " \n\t"}]}, ["an assistant turn with no content"]),
    ("chat", {"conversations": [USER, {**ANSWER, "content": "", "reasoning_content": "想一想"}]},
     ["an assistant turn with no content"]),  # it thinks, then says nothing
    ("chat", {"conversations": [USER, ANSWER, USER, {**ANSWER, "content": ""}]}, ["an assistant turn with no content"]),
    ("chat", {"instruction": "评价", "output": ""}, ["an assistant turn with no content"]),
    ("chat", {"conversations": [{"role": "system", "content": "你是助手。"}, ANSWER]}, ["no user turn"]),
    ("chat", {"conversations": [{"from": "gpt", "value": ""}]}, ["an assistant turn with no content", "no user turn"]),
    ("chat", {"conversations": [USER, {**ANSWER, "content": "好\u0000评"}]}, ["a NUL character in the text"]),
    ("chat", {"conversations": [USER, {**ANSWER, "reasoning_content": "\u0000"}]}, ["a NUL character in the text"]),
    ("chat", {"text": "文档\u0000"}, ["a NUL character in the text"]),
    ("chat", {"text": "文档"}, []),
    ("dpo", {"prompt": "q", "chosen": "a", "rejected": "b"}, []),
    ("dpo", {"prompt": "q", "chosen": "a", "rejected": ""}, []),  # an empty rejected answer is a fair lesson
    ("dpo", {"prompt": "q", "chosen": "a", "rejected": "a"}, ["chosen equals rejected"]),
    ("dpo", {"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]}, ["chosen equals rejected"]),
    ("dpo", {"question": "q", "response_chosen": " ", "response_rejected": "b"}, ["an empty chosen answer"]),
    ("dpo", {"prompt": [{"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"}, ["no user turn"]),
    ("dpo", {"prompt": "q", "chosen": "", "rejected": ""}, ["chosen equals rejected", "an empty chosen answer"]),
    ("dpo", {"prompt": "q", "chosen": "a", "rejected": "b\u0000"}, ["a NUL character in the text"]),
    ("pretrain", {"text": "a\u0000b"}, ["a NUL character in the text"]),
    ("pretrain", {"text": "ab"}, []),
    ("rl", {"prompt": "q\u0000"}, ["a NUL character in the text"]),
    ("rl", {"conversations": [USER, {**ANSWER, "content": ""}]}, []),  # MiniMind's RL files end so
]


@pytest.mark.parametrize("kind,raw,reasons", SUSPECT, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(SUSPECT)])
def test_suspect_reasons_of_each_kind(kind, raw, reasons):
    assert suspect_reasons(normalise(raw, kind), kind) == reasons


def test_suspect_records_are_read_and_counted_with_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [{"conversations": [USER, {**ANSWER, "content": f"好评{i}"}]} for i in range(4)]
    empty = {"conversations": [USER, {**ANSWER, "content": ""}]}
    both = {"conversations": [{"role": "system", "content": "s"}, {**ANSWER, "content": " "}]}
    records = [good[0], empty, good[1], both, good[2], empty]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    suspect = SuspectCounter()
    assert load_records(jsonl, "chat", suspect=suspect) == load_records(jsonl, "chat")  # read all the same
    assert suspect.records == 3 and suspect.by_reason == {"an assistant turn with no content": 3, "no user turn": 1}
    assert suspect.summary() == (f"kept 3 records that may teach the wrong thing: 3 x an assistant turn with no "
                                 f"content (e.g. {jsonl}:2); 1 x no user turn (e.g. {jsonl}:4)")
    again = SuspectCounter.from_dict(json.loads(json.dumps(suspect.to_dict())))
    assert again.summary() == suspect.summary()
    again.merge(suspect)
    assert again.records == 6 and again.summary().startswith("kept 6 records that may teach the wrong thing: 6 x")
    array = tmp_path / "b.json"
    array.write_text(f"[\n{json.dumps(good[0])},\n{json.dumps(empty)}\n]\n")  # record 2 starts on line 3
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([good[3], both]), parquet)
    for path, where in ((array, f"{array}:3: record 2"), (parquet, f"{parquet}: record 2")):
        suspect = SuspectCounter()
        assert len(load_records(str(path), "chat", suspect=suspect)) == 2
        assert f"(e.g. {where})" in suspect.summary() and suspect.records == 1


# --- properties --------------------------------------------------------------------------------------------

text = st.text(max_size=20)
nonblank = text.filter(str.strip)
roles = st.sampled_from(["system", "user", "assistant", "tool"])
message = st.fixed_dictionaries({"role": roles, "content": text}, optional={"reasoning_content": nonblank})
user_msg = st.fixed_dictionaries({"role": st.just("user"), "content": text})
assistant_msg = st.fixed_dictionaries({"role": st.just("assistant"), "content": text},
                                      optional={"reasoning_content": nonblank})
conversation = st.tuples(st.lists(message, max_size=4), assistant_msg, st.lists(message, max_size=3)).map(
    lambda parts: parts[0] + [parts[1]] + parts[2])
meta = st.dictionaries(st.sampled_from(["task", "answer", "id", "source"]), st.one_of(text, st.integers()))


@settings(max_examples=150, deadline=None)
@given(conversation, meta, st.sampled_from(["conversations", "messages"]))
def test_role_content_conversations_keep_their_contents(messages, extra, key):
    chat = normalise({key: messages, **extra}, "chat")
    assert chat == {"messages": messages, "meta": extra}


@settings(max_examples=150, deadline=None)
@given(conversation, meta)
def test_sharegpt_conversations_map_to_the_same_messages(messages, extra):
    speaker = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    record = {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in messages], **extra}
    expected = [{"role": m["role"], "content": m["content"]} for m in messages]
    assert normalise(record, "chat") == {"messages": expected, "meta": extra}


@settings(max_examples=150, deadline=None)
@given(text, text, text, meta)
def test_alpaca_keeps_instruction_input_output(instruction, extra_input, output, extra):
    chat = normalise({"instruction": instruction, "input": extra_input, "output": output, **extra}, "chat")
    user, assistant = chat["messages"]
    assert user["content"].startswith(instruction) and user["content"].endswith(extra_input)
    assert assistant == {"role": "assistant", "content": output}
    assert chat["meta"] == extra


@settings(max_examples=150, deadline=None)
@given(st.lists(message, max_size=3), user_msg, assistant_msg, assistant_msg, meta)
def test_dpo_pairs_keep_prompt_and_replies(history, question, good, bad, extra):
    history = [m for m in history if m["role"] != "user"] + [question]
    dpo = normalise({"chosen": history + [good], "rejected": history + [bad], **extra}, "dpo")
    assert dpo == {"prompt": history, "chosen": [good], "rejected": [bad], "meta": extra}


@settings(max_examples=150, deadline=None)
@given(nonblank, text, text)
def test_dpo_string_shapes_agree(question, good, bad):
    a = normalise({"prompt": question, "chosen": good, "rejected": bad}, "dpo")
    b = normalise({"question": question, "response_chosen": good, "response_rejected": bad}, "dpo")
    assert a == b and a["chosen"][0]["content"] == good and a["rejected"][0]["content"] == bad


@settings(max_examples=100, deadline=None)
@given(nonblank)
def test_pretrain_text_round_trips(value):
    assert normalise({"text": value, "id": 1}, "pretrain") == {"text": value}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "from", "value", "reasoning_content", "tool_calls", "text"]), inner,
        max_size=4),
    max_leaves=12,
)
FIELDS = ["text", "conversations", "messages", "tools", "instruction", "input", "output", "system", "history",
          "prompt", "chosen", "rejected", "question", "response_chosen", "response_rejected", "role", "content"]
garbage = json_values | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5)


@settings(max_examples=600, deadline=None)
@given(garbage, st.sampled_from(["pretrain", "chat", "dpo"]))
def test_garbage_normalises_or_raises_data_error(value, kind):
    try:
        record = normalise(value, kind, "g.jsonl", 9)
    except DataError as err:
        assert err.line == 9 and err.reason
        return
    assert set(record) <= {"text", "messages", "tools", "meta", "prompt", "chosen", "rejected"}
