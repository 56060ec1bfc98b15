"""--replay_kl (trainer/chat_stage.py's TextAnchor): the KL to the starting model on the replayed documents only,
against full forwards of both models computed by hand; and a chat stage wired with it."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from model import LM, LMConfig
from tests.conftest import CHAT_TINY, VOCAB, run_script
from trainer.chat_stage import TextAnchor, anchored_chat_loss, assistant_loss

EOT, IM_START = 0, 1


def packed_batch() -> dict:
    """Row 0: a chat (positions 0-4, its answer at 2-4) then a document (5-9, every position scored); row 1: one
    chat (answer at 6-9)."""
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (2, 10))
    ids[0, 0], ids[0, 5], ids[1, 0] = IM_START, EOT, IM_START
    labels = torch.randint(2, VOCAB, (2, 10))
    labels[0, :2] = labels[1, :6] = -100
    return dict(input_ids=ids, labels=labels, segment_ids=torch.tensor([[1] * 5 + [2] * 5, [1] * 10]),
                position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], list(range(10))]))


def by_hand_kl_sum(model: LM, start: LM, batch: dict, at: torch.Tensor) -> torch.Tensor:
    inputs = dict(segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
    ours = F.log_softmax(model(batch["input_ids"], **inputs).logits[at], dim=-1)
    theirs = F.log_softmax(start(batch["input_ids"], **inputs).logits[at], dim=-1)
    return (theirs.exp() * (theirs - ours)).sum()


def model_and_start(seed: int) -> tuple[LM, LM]:
    """A tiny model in training mode and a frozen starting model a little way from it."""
    torch.manual_seed(seed)
    model = LM(LMConfig.from_preset("tiny", vocab_size=VOCAB)).train()
    start = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, start


def test_the_anchor_adds_the_kl_to_the_starting_model_on_each_document_token():
    model, start = model_and_start(1)
    batch = packed_batch()
    anchor = TextAnchor(start, 0.7, document_start=EOT)

    documents = anchor.documents(batch)
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[0, 5:] = True
    assert torch.equal(documents, expected)

    plain = assistant_loss(model, batch)
    anchored = assistant_loss(model, batch, anchor=anchor)
    kl = by_hand_kl_sum(model, start, batch, documents)
    assert kl.item() > 1e-3
    scored = batch["labels"] != -100  # 13 positions: the loss is a sum over them / 13, the KL summed into it
    torch.testing.assert_close(anchored, plain + 0.7 * kl / scored.sum(), rtol=1e-5, atol=1e-5)
    weights = torch.rand(2, 10)  # a stage's weights (distillation's tags) weigh the cross-entropy, not the KL
    torch.testing.assert_close(assistant_loss(model, batch, weights, anchor=anchor),
                               assistant_loss(model, batch, weights) + 0.7 * kl / weights[scored].sum(),
                               rtol=1e-5, atol=1e-5)
    anchored.backward()
    assert all(p.grad is None for p in start.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0

    # Anchored to itself the KL is 0; a batch without documents and validation (eval mode) are the plain loss.
    torch.testing.assert_close(assistant_loss(model, batch, anchor=TextAnchor(copy.deepcopy(model), 5.0, EOT)),
                               plain, rtol=1e-5, atol=1e-5)
    chats_only = {key: value[1:] for key, value in batch.items()}
    torch.testing.assert_close(assistant_loss(model, chats_only, anchor=anchor), assistant_loss(model, chats_only))
    model.eval()
    torch.testing.assert_close(assistant_loss(model, batch, anchor=anchor), assistant_loss(model, batch))


def test_the_rl_replay_anchors_every_scored_token():
    """anchored_chat_loss (the RL stages' --replay_kl): the batch's mean cross-entropy, as assistant_loss gives it,
    and the KL to the starting model averaged over every scored position, the chat's answer and the document alike."""
    model, start = model_and_start(2)
    batch = packed_batch()
    scored = batch["labels"] != -100
    ce, kl = anchored_chat_loss(model, start, batch)
    torch.testing.assert_close(ce, assistant_loss(model, batch), rtol=1e-5, atol=1e-5)
    expected = by_hand_kl_sum(model, start, batch, scored) / scored.sum()
    assert expected.item() > 1e-3
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-6)
    kl.backward()
    assert all(p.grad is None for p in start.parameters()) and model.lm_head.weight.grad.abs().sum() > 0
    _, itself = anchored_chat_loss(model, copy.deepcopy(model), batch)
    assert itself.abs().item() < 1e-5


@pytest.mark.slow
def test_a_chat_stage_with_replay_kl(tmp_path, corpus, chat_checkpoint):
    """SFT on chats and documents: the anchor is the starting model (the first step's loss is the plain run's), it
    changes the loss after that, and it cannot be combined with --teacher."""
    args = ["--init_from", chat_checkpoint["model"], "--data_path", f"{chat_checkpoint['chats']},{corpus['train']}",
            "--val_data_path", "", *CHAT_TINY, "--batch_size", "4"]

    def losses(out, *extra):
        result = run_script("train_sft.py", *args, "--out_dir", tmp_path / out, *extra)
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return result, [r["loss"] for r in rows if "loss" in r]

    result, anchored = losses("anchored", "--replay_kl", "2")
    assert "replay KL: 2 * KL(" in result.stdout
    _, plain = losses("plain")
    assert len(anchored) == len(plain) == 3
    assert anchored[0] == pytest.approx(plain[0], rel=1e-5)
    assert anchored[1:] != pytest.approx(plain[1:], rel=1e-4)

    result = run_script("train_sft.py", *args, "--out_dir", tmp_path / "both", "--teacher", chat_checkpoint["model"],
                        "--replay_kl", "1", check=False)
    assert result.returncode == 2 and "use one of the two" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
