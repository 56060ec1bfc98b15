"""The BPE tokenizer stage: special-token ids, lossless round trip, the saved directory, MiniMind compatibility."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dataset.chat import render_chat
from dataset.tokenizer import (
    MARKUP_TOKENS,
    SPECIAL_BLOCK,
    SPECIAL_BLOCK_SIZE,
    load_tokenizer,
    round_trip_failures,
    save_tokenizer,
    train_bpe,
)

REPO = Path(__file__).resolve().parents[1]
MINIMIND_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind"

CHINESE = [
    "今天天气很好",
    "我们去公园散步",
    "人民日报发表新年讲话",
    "经济发展取得了新的成绩",
    "这家店的服务非常好",
    "产品质量一般，不太满意",
    "北京是中国的首都",
    "长城绵延上万里",
    "科学技术是第一生产力",
]
ENGLISH = [
    "the quick brown fox",
    "jumps over the lazy dog",
    "hello world",
    "machine learning is fun",
    "tokenizers split text into pieces",
    "in 1998 the economy grew by 8%",
]

# Held out: never in training text, and full of what byte-level BPE must still carry exactly.
HELD_OUT = [
    "你好，世界！Hello, world!",
    "表情 😀🎉 and a family 👨‍👩‍👧 with joiners",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\n\nand\r\nwindows line ends",
    "mixed scripts: Ελληνικά, русский, العربية, 한국어, 日本語のテキスト",
    "rare characters 龘靐齉 and math ∑∫√ ≠ ≤",
    "literal markup <think>not special</think> <|im_end|> stays text",
    "",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
]


def make_corpus(lines: int = 300, seed: int = 0) -> list[str]:
    """A few hundred lines of Chinese and ASCII text, enough for a ~500-token vocabulary in a second."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        parts = rng.sample(CHINESE, 2) + rng.sample(ENGLISH, 1) + [str(rng.randint(0, 2000))]
        rng.shuffle(parts)
        corpus.append("，".join(parts[:2]) + "。 " + " ".join(parts[2:]))
    return corpus


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe(make_corpus(), vocab_size=500)


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tokenizer, out)
    return out


def test_special_token_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_BLOCK] == list(range(SPECIAL_BLOCK_SIZE))
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0,
        0,
        1,
        2,
    )
    assert SPECIAL_BLOCK[:11] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
    ]
    assert SPECIAL_BLOCK[-1] == "<|reserved_20|>"
    assert len(tokenizer) == 500


def test_special_tokens_are_single_ids_and_markup_survives_decode(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\n想</think>\n\n好<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.convert_tokens_to_ids("<think>") in ids and tokenizer.convert_tokens_to_ids("</think>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\n想</think>\n\n好"
    for token in MARKUP_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]


def test_no_bos_or_eos_added(tokenizer):
    ids = tokenizer("hello")["input_ids"]
    assert ids == tokenizer.encode("hello", add_special_tokens=False)
    assert 1 not in ids and 2 not in ids


def test_round_trip_on_held_out_text(tokenizer):
    failures, tokens = round_trip_failures(tokenizer, HELD_OUT)
    assert failures == []
    assert tokens > 0


def test_bpe_learned_merges(tokenizer):
    # Frequent byte sequences became tokens: new text of the training kind takes well under 1 token per byte.
    texts = make_corpus(seed=1)
    assert (
        sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])) < sum(len(t.encode()) for t in texts) / 2
    )
    assert len(tokenizer.encode("天气很好", add_special_tokens=False)) <= 3  # 12 UTF-8 bytes


def test_every_digit_is_its_own_token(tokenizer):
    # The corpus is full of numbers up to 2000, which GPT-2's split alone would merge into whole-number tokens.
    text = "共1234个，2024年1月23日，3.14 and 100%"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12342024123314100")


def test_saved_dir_loads_in_transformers(tokenizer, saved_dir):
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == tokenizer.chat_template
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    special = json.loads((saved_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special["eos_token"] == "<|im_end|>"
    assert not (saved_dir / "chat_template.jinja").exists()

    loaded = AutoTokenizer.from_pretrained(str(saved_dir))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    for text in HELD_OUT:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    messages = [
        {"role": "system", "content": "简洁"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
    ]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\n简洁<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == render_chat(messages, add_generation_prompt=True)


def test_load_tokenizer_matches_and_names_missing_dir(saved_dir, tmp_path):
    assert load_tokenizer(saved_dir).encode("你好 world") == AutoTokenizer.from_pretrained(str(saved_dir)).encode(
        "你好 world"
    )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(not MINIMIND_DIR.is_dir(), reason="shared MiniMind fixture absent")
def test_minimind_tokenizer_loads_and_round_trips():
    minimind = load_tokenizer(MINIMIND_DIR)
    assert len(minimind) == 6400
    assert (minimind.bos_token_id, minimind.eos_token_id, minimind.pad_token_id) == (1, 2, 0)
    saved = json.loads((MINIMIND_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert minimind.chat_template == saved  # its own template, left alone
    assert round_trip_failures(minimind, HELD_OUT)[0] == []


def run_train_tokenizer(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "train_tokenizer.py", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.mark.slow
def test_script_end_to_end(tmp_path):
    corpus = make_corpus()
    held_out = [text for text in HELD_OUT if text]  # the reader rejects empty records
    train, val = write_texts(tmp_path / "train.jsonl", corpus), write_texts(tmp_path / "val.jsonl", held_out)
    out = tmp_path / "tok"
    result = run_train_tokenizer("--data_path", train, "--val_data_path", val, "--out_dir", out,
                                 "--vocab_size", 450, "--max_chars", 5000)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{len(held_out)}/{len(held_out)} lines" in result.stdout
    assert "chars/token" in result.stdout
    trained_chars = int(result.stdout.split("training text")[1].split("chars")[0].replace(",", ""))
    assert 5000 <= trained_chars < 5000 + max(map(len, corpus))
    assert len(load_tokenizer(out)) == 450


@pytest.mark.slow
def test_script_bad_line_stops_or_is_skipped(tmp_path):
    corpus = make_corpus(100)
    corpus[49] = "一段\0文字"  # a NUL character: trained on, and counted as the pretraining bins count it
    train = write_texts(tmp_path / "train.jsonl", corpus)
    with train.open("a", encoding="utf-8") as f:
        f.write('{"text": "unterminated\n')
    args = ("--data_path", train, "--val_data_path", "", "--out_dir", tmp_path / "tok", "--vocab_size", 300)
    stopped = run_train_tokenizer(*args)
    assert stopped.returncode != 0 and f"{train}:101:" in stopped.stderr
    assert not (tmp_path / "tok").exists()
    skipped = run_train_tokenizer(*args, "--skip_bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 bad lines" in skipped.stdout
    assert f"kept 1 record that may teach the wrong thing: 1 x a NUL character in the text (e.g. {train}:50)" \
        in skipped.stdout
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_model_ids_come_from_the_tokenizer_module():
    from model.config import BOS_ID, DEFAULTS, EOS_ID, PAD_ID

    named = tuple(SPECIAL_BLOCK.index(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2) == named
    assert (DEFAULTS["pad_token_id"], DEFAULTS["bos_token_id"], DEFAULTS["eos_token_id"]) == (0, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["dataset.tokenizer", "dataset.errors", "dataset.bins", "train_tokenizer",
                                    "scripts.prepare_data"])
def test_tokenizer_and_bins_load_without_torch(module):
    """Training a tokenizer and preparing token bins must not pay for (or need) importing torch."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
