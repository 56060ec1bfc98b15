"""The reward model: scores equal transformers' LlamaForSequenceClassification on our saved directory, and
train_reward.py end to end (every preference-pair shape, held-out pair accuracy, a model that learns the pairs)."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from dataset.chat import load_tokenizer
from dataset.lm_dataset import DPODataset, collate_dpo
from model import LM, LMConfig
from model.heads import ScalarModel, last_token_index
from tests.conftest import CHAT_TINY, FIXTURES, VOCAB, run_script


def perturbed_reward_model(**shape) -> ScalarModel:
    torch.manual_seed(0)
    model = ScalarModel.from_causal_lm(LM(LMConfig.from_preset("tiny", vocab_size=VOCAB, **shape))).eval()
    with torch.no_grad():  # norms start at 1 and the head near 0; perturb so that a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or "score" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("shape", [dict(), dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e4)])
def test_transformers_loads_the_directory_and_scores_the_same(tmp_path, shape):
    ours = perturbed_reward_model(**shape)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["model_type"] == "llama"
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "LlamaForSequenceClassification"
    assert theirs.config.num_labels == 1 and theirs.config.pad_token_id == ours.config.pad_token_id == 0
    assert set(theirs.state_dict()) == set(ours.state_dict())
    assert "score.weight" in ours.state_dict() and all(k == "score.weight" or k.startswith("model.")
                                                       for k in ours.state_dict())
    torch.manual_seed(1)
    right = torch.randint(1, VOCAB, (4, 11))
    lengths = [11, 7, 3, 9]
    for row, n in enumerate(lengths):
        right[row, n:] = 0  # right padding with the pad id
    mask = (right != 0).long()
    left = torch.stack([torch.cat([row[n:], row[:n]]) for row, n in zip(right, lengths)])  # the same, left-padded
    with torch.no_grad():
        expected = torch.stack([ours(row[None, :n])[0, -1] for row, n in zip(right, lengths)])  # one at a time
        for ids, attention in ((right, None), (right, mask), (left, (left != 0).long())):
            got_ours = ours.sequence_scores(ids, attention)
            got_theirs = theirs(ids, attention_mask=attention).logits[:, 0]
            assert (got_ours - got_theirs).abs().max().item() < 1e-4
            assert (got_ours - expected).abs().max().item() < 1e-4
        assert (ScalarModel.from_pretrained(tmp_path).sequence_scores(right) - expected).abs().max() < 1e-4


def test_last_token_index_is_transformers_rule():
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [9, 9, 9, 9]])
    assert last_token_index(ids, pad_token_id=0).tolist() == [1, 3, 3]


@pytest.mark.slow
def test_train_reward_end_to_end_on_every_pair_shape(tmp_path, chat_checkpoint):
    fixtures = ",".join(str(p) for p in sorted((FIXTURES / "formats").glob("dpo_*.jsonl")))
    out = tmp_path / "reward"
    done = run_script("train_reward.py", "--init_from", chat_checkpoint["model"], "--data_path", fixtures,
                      "--val_data_path", fixtures, "--out_dir", out, *CHAT_TINY, "--batch_size", "2",
                      "--center_rewards", "0.01", "--margin", "0.1")
    assert "held-out pair accuracy" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in r for r in rows) and any("val_accuracy" in r for r in rows)
    assert 0 <= json.loads((out / "summary.json").read_text())["val_accuracy"] <= 1
    theirs = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = ScalarModel.from_pretrained(out).eval()
    tokenizer = load_tokenizer(out)
    pairs = [item for item in DPODataset(fixtures, tokenizer, 96)]
    files = sorted((FIXTURES / "formats").glob("dpo_*.jsonl"))
    records = sum(1 for f in files for line in f.read_text().splitlines() if line.strip())
    assert len(pairs) == records and f"data: {records:,} pairs" in done.stdout  # every shape's pairs read
    batch = collate_dpo(pairs[:3], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        got_theirs = theirs(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        assert (ours.sequence_scores(batch["input_ids"]) - got_theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_reward_model_learns_the_pairs(tmp_path, chat_checkpoint):
    """Pairs whose chosen answer states the review's label and whose rejected one the other label: the model
    learns to rank them (train = held-out here: this checks the loss and the plumbing, not generalisation)."""
    out = tmp_path / "reward"
    run_script("train_reward.py", "--init_from", chat_checkpoint["model"], "--data_path", chat_checkpoint["pairs"],
               "--val_data_path", chat_checkpoint["pairs"], "--out_dir", out, "--batch_size", "8",
               "--max_seq_len", "96", "--log_every", "5", "--eval_every", "0", "--eval_batches", "20",
               "--dtype", "fp32", "--warmup_steps", "2", "--max_steps", "40", "--learning_rate", "3e-3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.75, summary  # 0.80 measured after 40 steps (chance: 0.5)
