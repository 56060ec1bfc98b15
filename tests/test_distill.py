"""train_distill_reason.py: the tags' weights (as the dataset's token weights), the tag lookup per tokenizer, and the
script end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from dataset.chat import load_tokenizer
from dataset.lm_dataset import IGNORE_INDEX, SFTDataset
from model import LM
from tests.conftest import CHAT_TINY, FIXTURES, run_script, tiny_checkpoint, write_jsonl
from train_distill_reason import TAGS, tag_weights
from trainer.chat_stage import assistant_loss as sft_loss_fn
from trainer.chat_stage import assistant_tokens, token_weight_ids

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


def tag_batch(tmp_path, tokenizer, tag_weight: float, **options) -> dict:
    """The two traces as one batch of rows, with the script's tag weights as the dataset's token weights."""
    data = SFTDataset(str(write_jsonl(tmp_path / "reason.jsonl", TRACES)), tokenizer, max_seq_len=160,
                      token_weights=token_weight_ids(tag_weights(tokenizer, tag_weight), tokenizer), **options)
    return {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}


def test_tag_weight_one_is_plain_sft_and_more_weights_the_tags(tmp_path, tokenizer_dir, checkpoint):
    tokenizer = load_tokenizer(tokenizer_dir)
    plain_batch = tag_batch(tmp_path, tokenizer, 1.0)
    assert "loss_weights" not in plain_batch  # weight 1: plain SFT
    batch = tag_batch(tmp_path, tokenizer, 3.0)
    tag_ids = torch.tensor([tokenizer.convert_tokens_to_ids(tag) for tag in TAGS])
    labels = batch["labels"]
    assert int(torch.isin(labels, tag_ids).sum()) == 4 * len(TRACES)  # every tag is a target

    model = LM.from_pretrained(checkpoint)
    with torch.no_grad():
        plain = sft_loss_fn(model, plain_batch)
        weighted = sft_loss_fn(model, batch)
        # By hand: each tag token's NLL counts 3 times, and so does it in the normaliser.
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"],
                       position_ids=batch["position_ids"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    scored = labels.flatten() != IGNORE_INDEX
    weights = torch.where(torch.isin(labels.flatten(), tag_ids), 3.0, 1.0)[scored]
    assert torch.allclose(weighted, (nll[scored] * weights).sum() / weights.sum(), atol=1e-5)
    assert torch.allclose(plain, nll[scored].mean(), atol=1e-5)
    assert float(assistant_tokens(batch)) == float(weights.sum())  # what the trainer weighs this batch by
    assert not torch.allclose(weighted, plain, atol=1e-4)


def test_tag_weights_multiply_the_prompt_loss_weights(tmp_path, tokenizer_dir, checkpoint):
    tokenizer = load_tokenizer(tokenizer_dir)
    batch = tag_batch(tmp_path, tokenizer, 3.0, prompt_loss_weight=0.5)
    labels = batch["labels"].flatten()
    scored = labels != IGNORE_INDEX
    tag_ids = torch.tensor([tokenizer.convert_tokens_to_ids(tag) for tag in TAGS])
    prompt = batch["loss_weights"].flatten() < 1
    assert set(batch["loss_weights"].flatten()[scored].tolist()) == {0.5, 1.0, 3.0}  # prompt, answer, tag
    assert torch.equal(batch["loss_weights"].flatten()[scored] == 3.0, torch.isin(labels, tag_ids)[scored])
    assert not (prompt & torch.isin(labels, tag_ids)).any()


def test_tag_weights_are_the_tags_the_tokenizer_has(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tag_weights(tokenizer, 2.0) == [(tag, 2.0) for tag in TAGS]
    assert tag_weights(tokenizer, 1.0) == []
    assert sorted(token_weight_ids(tag_weights(tokenizer, 2.0), tokenizer)) == sorted(
        tokenizer.convert_tokens_to_ids(list(TAGS)))
    if (MINIMIND_DIR / "tokenizer.json").is_file():  # MiniMind's tokenizer has only the think tags
        minimind = load_tokenizer(MINIMIND_DIR)
        pairs = tag_weights(minimind, 2.0)
        assert pairs == [("<think>", 2.0), ("</think>", 2.0)]
        think_ids = minimind.convert_tokens_to_ids(["<think>", "</think>"])
        assert sorted(token_weight_ids(pairs, minimind)) == sorted(think_ids)


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
