"""The reward-model, GRPO and PPO formulas of trainer/losses.py against values computed by hand."""

import math

import pytest
import torch

from trainer.losses import (
    aggregate_loss,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    group_advantages,
    k3_kl,
    token_entropy,
    whiten,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logsigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_bradley_terry_with_margin_and_centering():
    chosen, rejected = t([2.0, 0.0]), t([1.0, 1.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(-(logsigmoid(1.0) + logsigmoid(-1.0)) / 2)
    expected = -(logsigmoid(0.5) + logsigmoid(-1.5)) / 2 + 0.01 * (9.0 + 1.0) / 2
    assert bradley_terry_loss(chosen, rejected, margin=0.5, center_coef=0.01).item() == pytest.approx(expected)


def test_group_advantages_by_hand():
    rewards = t([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, std with Bessel's correction sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal -> 0
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert group_advantages(t([3.0, 1.0]), 2).tolist() == pytest.approx([1 / (math.sqrt(2) + 1e-4),
                                                                          -1 / (math.sqrt(2) + 1e-4)])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_gae_by_hand():
    # one response of 3 tokens (the 4th position is padding: its value 9 must not leak in), gamma 0.9, lambda 0.8
    rewards, values, mask = t([[0.0, 0.0, 1.0, 5.0]]), t([[0.5, 0.2, 0.4, 9.0]]), t([[1, 1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 1.0 + 0.9 * 0.0 - 0.4  # the value after the last response token is 0
    a1 = (0.0 + 0.9 * 0.4 - 0.2) + 0.9 * 0.8 * a2
    a0 = (0.0 + 0.9 * 0.2 - 0.5) + 0.9 * 0.8 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert (a0, a1, a2) == pytest.approx((0.10624, 0.592, 0.6))
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0])


def test_gae_defaults_and_rows_of_different_lengths():
    rewards, values = t([[0.0, 2.0], [3.0, 0.0]]), t([[1.0, 1.0], [0.5, 7.0]])
    mask = t([[1, 1], [1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask)  # gamma 1, lambda 0.95
    a1 = 2.0 - 1.0
    assert advantages.flatten().tolist() == pytest.approx([(0.0 + 1.0 - 1.0) + 0.95 * a1, a1, 3.0 - 0.5, 0.0])
    assert returns.flatten().tolist() == pytest.approx([0.95 + 1.0, 2.0, 3.0, 0.0])


def test_clipped_policy_loss_by_hand():
    ratios = [1.5, 0.7, 1.1]
    logps, old = t([ratios, ratios]).log(), t([[0.0] * 3] * 2)
    advantages = t([[1.0], [-1.0]])
    loss, clipped = clipped_policy_loss(logps, old, advantages, clip_low=0.2)
    # A > 0: -min(r, clip(r, 0.8, 1.2)); A < 0: -min(-r, -clip(r)) = max(r, clip(r))
    assert loss.tolist() == [pytest.approx(v) for v in ([-1.2, -0.7, -1.1], [1.5, 0.8, 1.1])]
    assert clipped.tolist() == [[1, 0, 0], [0, 1, 0]]
    # clip-higher: the upper bound moves to 1 + 0.6, the lower stays
    loss, clipped = clipped_policy_loss(logps, old, advantages, clip_low=0.2, clip_high=0.6)
    assert loss[0].tolist() == pytest.approx([-1.5, -0.7, -1.1]) and clipped[0].tolist() == [0, 0, 0]


def test_clipped_tokens_get_no_gradient():
    logps = t([[math.log(1.5), math.log(1.1)]]).requires_grad_()
    loss, _ = clipped_policy_loss(logps, torch.zeros(1, 2, dtype=torch.float64), t([[2.0]]))
    loss.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([0.0, -2.0 * 1.1])  # d(-r * A)/d logp = -r * A


def test_aggregations_by_hand():
    per_token, mask = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(per_token, mask, "grpo").item() == pytest.approx((1.5 + 4.0) / 2)
    assert aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(7 / 8)
    assert aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate_loss(per_token, mask, "ppo")


def test_k3_kl_by_hand():
    kl = k3_kl(t([math.log(0.5), math.log(0.3)]), t([math.log(0.25), math.log(0.3)]))
    assert kl.tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0])  # exp(d) - d - 1 with d = ref - logp


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = t([[1.0, 0.0, 3.0]]), t([[0.5, 0.0, 0.0]]), t([[2.0, -1.0, 0.0]]), t([[1, 1, 0]])
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (1 - 2)^2 = 1, clipped (0.7 - 2)^2 = 1.69 -> 1.69; token 1: both 1.0; token 2 masked
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_whiten_and_entropy_by_hand():
    assert whiten(t([1.0, 2.0, 3.0, 9.0]), t([1, 1, 1, 0])).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    assert whiten(t([1.0, 3.0]), t([1, 1]), mean=t(1.0), var=t(4.0)).tolist() == pytest.approx([0.0, 1.0])
    assert token_entropy(torch.zeros(1, 1, 2)).item() == pytest.approx(math.log(2))
    p = [0.7, 0.2, 0.1]
    assert token_entropy(torch.tensor([[p]]).log()).item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-6)
