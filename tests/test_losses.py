"""Preference and token losses against values computed by hand with math.log / math.exp."""

import math
from types import SimpleNamespace

import pytest
import torch

from trainer.chat_stage import assistant_loss
from trainer.losses import (
    chosen_nll,
    dpo_loss,
    label_logps,
    token_counts,
    token_logps,
)


def logsigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def log_softmax_at(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


LOGITS = [[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 0.25]]]  # 1 x 3 x 4
LABELS = [[1, -100, 0]]

# Two pairs: (policy chosen, policy rejected, ref chosen, ref rejected)
PC, PR, RC, RR = [-5.0, -7.0], [-6.0, -5.5], [-5.5, -6.5], [-6.2, -6.0]


def pair_tensors():
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR))


class GivenLogits(torch.nn.Module):
    """A stand-in model whose logits are given; logits_at selects positions as LM.forward does. It counts the
    positions it was asked for, to show which path label_logps took."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.positions = logits, []

    def forward(self, input_ids, logits_at=None, **inputs):
        self.positions.append(int(logits_at.sum()) if logits_at is not None else self.logits.shape[:2].numel())
        return SimpleNamespace(logits=self.logits if logits_at is None else self.logits[logits_at])


def test_label_logps_by_hand():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    first, last = log_softmax_at(LOGITS[0][0], 1), log_softmax_at(LOGITS[0][2], 0)
    # one position of six labelled: the output layer runs there alone
    model = GivenLogits(torch.cat([logits, torch.zeros(1, 3, 4)], dim=1))
    sparse = torch.tensor([[-100, -100, 0, -100, -100, -100]])
    logps, mask = label_logps(model, sparse.clamp(min=0), sparse)
    torch.testing.assert_close(logps, torch.tensor([[0.0, 0.0, last, 0.0, 0.0, 0.0]]))
    assert mask.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]] and model.positions == [1]
    # two of three (more than DENSE_SHARE): the whole output layer, the same figures
    model = GivenLogits(logits)
    logps, mask = label_logps(model, labels.clamp(min=0), labels)
    torch.testing.assert_close(logps, torch.tensor([[first, 0.0, last]]))
    assert mask.tolist() == [[1.0, 0.0, 1.0]] and model.positions[-1] == 3
    assert token_counts(labels).tolist() == [2]


def test_label_logps_equals_token_logps_of_a_real_model_in_bf16_with_gradients():
    from model import LM, LMConfig

    torch.manual_seed(0)
    model = LM(LMConfig.from_preset("tiny", vocab_size=300))
    ids = torch.randint(0, 300, (3, 40))
    labels = torch.where(torch.rand(3, 40) < 0.2, torch.randint(0, 300, (3, 40)), torch.tensor(-100))
    results = []
    for fn in (lambda: token_logps(model(ids).logits, labels), lambda: label_logps(model, ids, labels)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, mask = fn()
        assert logps.dtype == torch.float32
        model.zero_grad()
        (logps * mask).sum().backward()
        results.append((logps.detach(), mask, [p.grad.clone() for p in model.parameters()]))
    (full, full_mask, full_grads), (sparse, sparse_mask, sparse_grads) = results
    assert torch.equal(full_mask, sparse_mask) and (sparse[sparse_mask == 0] == 0).all()
    torch.testing.assert_close(sparse, full, atol=2e-2, rtol=1e-2)  # bf16 matmuls of different shapes
    for a, b in zip(full_grads, sparse_grads):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=5e-2)


def test_token_logps_zero_where_masked():
    logps, mask = token_logps(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert mask.tolist() == [[1.0, 0.0, 1.0]]
    assert logps[0, 1] == 0


def test_dpo_sigmoid_by_hand():
    margins = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]
    expected = sum(-logsigmoid(0.1 * m) for m in margins) / 2
    loss, chosen_r, rejected_r = dpo_loss(*pair_tensors(), beta=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert chosen_r.tolist() == pytest.approx([0.1 * (PC[i] - RC[i]) for i in range(2)])
    assert rejected_r.tolist() == pytest.approx([0.1 * (PR[i] - RR[i]) for i in range(2)])


def test_dpo_label_smoothing_by_hand_and_zero_is_plain_dpo():
    margins = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]
    eps, beta = 0.2, 0.5
    expected = sum(-(1 - eps) * logsigmoid(beta * m) - eps * logsigmoid(-beta * m) for m in margins) / 2
    assert dpo_loss(*pair_tensors(), beta=beta, label_smoothing=eps)[0].item() == pytest.approx(expected, abs=1e-12)
    plain = dpo_loss(*pair_tensors(), beta=beta)[0]
    assert dpo_loss(*pair_tensors(), beta=beta, label_smoothing=0.0)[0].item() == plain.item()


def test_ipo_by_hand():
    beta = 0.25
    margins = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]
    expected = sum((m - 1 / (2 * beta)) ** 2 for m in margins) / 2
    assert dpo_loss(*pair_tensors(), beta=beta, loss_type="ipo")[0].item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*pair_tensors(), loss_type="ipo", label_smoothing=0.1)


def test_simpo_by_hand_without_reference():
    beta, gamma = 2.0, 0.5
    chosen_avg, rejected_avg = [-1.2, -0.8], [-1.5, -0.6]
    expected = sum(-logsigmoid(beta * (chosen_avg[i] - rejected_avg[i]) - gamma) for i in range(2)) / 2
    loss, chosen_r, rejected_r = dpo_loss(torch.tensor(chosen_avg, dtype=torch.float64),
                                          torch.tensor(rejected_avg, dtype=torch.float64), None, None,
                                          beta=beta, loss_type="simpo", simpo_gamma=gamma)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert chosen_r.tolist() == pytest.approx([beta * v for v in chosen_avg])
    assert rejected_r.tolist() == pytest.approx([beta * v for v in rejected_avg])


def test_reference_losses_need_reference_and_unknown_type_fails():
    pc, pr, _, _ = pair_tensors()
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(pc, pr, None, None)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(*pair_tensors(), loss_type="kto")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_raising_chosen_logp_lowers_loss(loss_type):
    pc, pr, rc, rr = pair_tensors()
    pc.requires_grad_()
    pr.requires_grad_()
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    with torch.no_grad():
        assert dpo_loss(pc + 0.5, pr, rc, rr, beta=0.1, loss_type=loss_type)[0] < loss


def test_chosen_nll():
    assert chosen_nll(torch.tensor([-1.0, -3.0])).item() == pytest.approx(2.0)


def chat_batch(labels: torch.Tensor, **fields) -> dict:
    return dict(input_ids=labels.clamp(min=0), labels=labels, segment_ids=torch.ones_like(labels),
                position_ids=torch.arange(labels.shape[1])[None], **fields)


def test_assistant_loss_by_hand():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    nll_first, nll_last = -log_softmax_at(LOGITS[0][0], 1), -log_softmax_at(LOGITS[0][2], 0)
    model = GivenLogits(logits)
    assert assistant_loss(model, chat_batch(labels)).item() == pytest.approx((nll_first + nll_last) / 2, abs=1e-6)
    plain = torch.nn.functional.cross_entropy(logits.view(-1, 4), labels.view(-1))
    torch.testing.assert_close(assistant_loss(model, chat_batch(labels)), plain)
    # Weight 3 on the first target token (id 1); the ignored position's weight must not count.
    weights = torch.tensor([[3.0, 1.0, 1.0]])
    expected = (3 * nll_first + nll_last) / 4
    assert assistant_loss(model, chat_batch(labels), weights).item() == pytest.approx(expected, abs=1e-6)
    # --prompt_loss_weight's loss_weights are the default weights
    assert assistant_loss(model, chat_batch(labels, loss_weights=weights)).item() == pytest.approx(expected, abs=1e-6)


def test_assistant_loss_with_no_targets_is_zero():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = assistant_loss(GivenLogits(logits), chat_batch(torch.full((1, 3), -100)))
    assert loss.item() == 0
    loss.backward()
