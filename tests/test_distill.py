"""train_distill_reason.py: the tag-weighted loss, the tag lookup per tokenizer, and the script end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from dataset.chat import load_tokenizer
from dataset.lm_dataset import IGNORE_INDEX, SFTDataset
from model import LM
from tests.conftest import CHAT_TINY, FIXTURES, run_script, tiny_checkpoint, write_jsonl
from train_distill_reason import TAGS, make_loss_fn, tag_token_ids
from trainer.chat_stage import assistant_loss as sft_loss_fn

REASON_FIXTURE = FIXTURES / "formats" / "reason_think_answer.jsonl"
MINIMIND_DIR = FIXTURES / "minimind"

TRACES = [
    {"conversations": [
        {"role": "user", "content": "小明有3个苹果，又买了4个，现在有几个？"},
        {"role": "assistant", "content": "<think>\n3+4=7。\n</think>\n<answer>\n现在有7个。\n</answer>"}]},
    {"conversations": [
        {"role": "user", "content": "一盒有6支笔，2盒有几支？"},
        {"role": "assistant", "content": "<think>\n6×2=12。\n</think>\n<answer>\n有12支。\n</answer>"}]},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return tiny_checkpoint(tokenizer_dir, tmp_path_factory.mktemp("sft"))


def test_tag_weight_one_is_plain_sft_and_more_weights_the_tags(tmp_path, tokenizer_dir, checkpoint):
    tokenizer = load_tokenizer(tokenizer_dir)
    data = SFTDataset(str(write_jsonl(tmp_path / "reason.jsonl", TRACES)), tokenizer, max_seq_len=160)
    batch = {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}
    tag_ids = tag_token_ids(tokenizer)
    labels = batch["labels"]
    assert int(torch.isin(labels, torch.tensor(tag_ids)).sum()) == 4 * len(TRACES)  # every tag is a target

    model = LM.from_pretrained(checkpoint)
    with torch.no_grad():
        plain = sft_loss_fn(model, batch)
        assert torch.allclose(make_loss_fn(tag_ids, 1.0)[0](model, batch), plain, atol=1e-6)
        weighted_loss, weight_total = make_loss_fn(tag_ids, 3.0)
        weighted = weighted_loss(model, batch)
        # By hand: each tag token's NLL counts 3 times, and so does it in the normaliser.
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                       position_ids=batch["position_ids"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    scored = labels.flatten() != IGNORE_INDEX
    weights = torch.where(torch.isin(labels.flatten(), torch.tensor(tag_ids)), 3.0, 1.0)[scored]
    assert torch.allclose(weighted, (nll[scored] * weights).sum() / weights.sum(), atol=1e-5)
    assert float(weight_total(batch)) == float(weights.sum())  # what the trainer weighs this batch by
    assert not torch.allclose(weighted, plain, atol=1e-4)


def test_tag_weights_multiply_the_prompt_loss_weights(tmp_path, tokenizer_dir, checkpoint):
    tokenizer = load_tokenizer(tokenizer_dir)
    data = SFTDataset(str(write_jsonl(tmp_path / "reason.jsonl", TRACES)), tokenizer, max_seq_len=160,
                      prompt_loss_weight=0.5)
    batch = {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}
    tag_ids = tag_token_ids(tokenizer)
    loss_fn, weight_total = make_loss_fn(tag_ids, 3.0)
    labels = batch["labels"].flatten()
    scored = labels != IGNORE_INDEX
    weights = (batch["loss_weights"].flatten() * torch.where(torch.isin(labels, torch.tensor(tag_ids)), 3.0, 1.0))
    model = LM.from_pretrained(checkpoint)
    with torch.no_grad():
        loss = loss_fn(model, batch)
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                       position_ids=batch["position_ids"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="none")
    assert set(weights[scored].tolist()) == {0.5, 1.0, 3.0}  # prompt, answer, tag
    assert torch.allclose(loss, (nll * weights)[scored].sum() / weights[scored].sum(), atol=1e-5)
    assert float(weight_total(batch)) == pytest.approx(float(weights[scored].sum()))


def test_tag_ids_are_those_the_tokenizer_has(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tag_token_ids(tokenizer)
    assert len(set(ids)) == 4 and [tokenizer.convert_ids_to_tokens(i) for i in ids] == list(TAGS)
    if (MINIMIND_DIR / "tokenizer.json").is_file():  # MiniMind's tokenizer has only the think tags
        minimind = load_tokenizer(MINIMIND_DIR)
        assert [minimind.convert_ids_to_tokens(i) for i in tag_token_ids(minimind)] == ["<think>", "</think>"]


@pytest.mark.slow
@pytest.mark.skipif(not REASON_FIXTURE.is_file(), reason="shared fixtures absent")
def test_distill_script_trains_on_the_reasoning_fixture(tmp_path, checkpoint):
    data = write_jsonl(tmp_path / "reason.jsonl", TRACES)
    out = tmp_path / "reason"
    result = run_script("train_distill_reason.py", "--data_path", f"{REASON_FIXTURE},{data}", "--val_data_path",
                        REASON_FIXTURE, "--init_from", checkpoint, "--out_dir", out, "--tag_weight", "2",
                        "--sample_prompt", "3+4等于几？", *CHAT_TINY)
    assert "tag weight 2.0 on 4 tag tokens" in result.stdout
    assert "4 conversations" in result.stdout and "val loss" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "args.json").read_text())["tag_weight"] == 2.0
    assert (out / "model.safetensors").is_file()
