"""Preference and token losses against values computed by hand with math.log / math.exp."""

import math

import pytest
import torch

from trainer.losses import (
    chosen_nll,
    dpo_loss,
    sequence_logps,
    token_counts,
    token_logps,
    token_weights,
    weighted_token_loss,
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


def test_sequence_logps_by_hand():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    first, last = log_softmax_at(LOGITS[0][0], 1), log_softmax_at(LOGITS[0][2], 0)
    torch.testing.assert_close(sequence_logps(logits, labels), torch.tensor([first + last]))
    torch.testing.assert_close(sequence_logps(logits, labels, average=True), torch.tensor([(first + last) / 2]))
    # An extra loss mask drops position 2 as well.
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(sequence_logps(logits, labels, loss_mask=mask), torch.tensor([first]))
    assert token_counts(labels).tolist() == [2]


def test_sequence_logps_bf16_matches_fp32_and_keeps_grad():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    half = logits.bfloat16().requires_grad_()
    result = sequence_logps(half, labels)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, sequence_logps(half.detach().float(), labels))
    result.sum().backward()
    assert half.grad[0, :2].abs().sum() == 0 and half.grad[1].abs().sum() > 0


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


def test_weighted_token_loss_by_hand():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    nll_first, nll_last = -log_softmax_at(LOGITS[0][0], 1), -log_softmax_at(LOGITS[0][2], 0)
    assert weighted_token_loss(logits, labels).item() == pytest.approx((nll_first + nll_last) / 2, abs=1e-6)
    plain = torch.nn.functional.cross_entropy(logits.view(-1, 4), labels.view(-1))
    torch.testing.assert_close(weighted_token_loss(logits, labels), plain)
    # Weight 3 on the first target token (id 1); the ignored position's weight must not count.
    weights = token_weights(labels, [1], 3.0)
    assert weights.tolist() == [[3.0, 1.0, 1.0]]
    expected = (3 * nll_first + nll_last) / 4
    assert weighted_token_loss(logits, labels, weights).item() == pytest.approx(expected, abs=1e-6)


def test_weighted_token_loss_with_no_targets_is_zero():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = weighted_token_loss(logits, torch.full((1, 3), -100))
    assert loss.item() == 0
    loss.backward()
