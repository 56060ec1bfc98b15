"""Losses for the SFT, DPO and distillation stages, as pure functions of logits, labels and log-probabilities.

Conventions: `labels[b, t]` is the target token for position t of `logits[b, t]` — the caller has already shifted
(`logits[:, :-1]` against `input_ids[:, 1:]`) — and positions whose label is IGNORE_INDEX (-100) count for
nothing.

How a preference stage puts them together (policy and reference run on the same chosen / rejected batch):

    chosen_sum, chosen_count = sequence_logps(policy_logits_c, labels_c), token_counts(labels_c)
    loss, chosen_r, rejected_r = dpo_loss(chosen_sum, rejected_sum, ref_chosen_sum, ref_rejected_sum, beta)
    loss = loss + rpo_alpha * chosen_nll(chosen_sum / chosen_count)      # optional, --rpo_alpha > 0

`sigmoid` takes summed log-probs; `ipo` and `simpo` are meant for length-averaged ones (sum / count), as their papers
and TRL use them. `token_logps` gives both from one log-softmax.
"""

import torch
import torch.nn.functional as F

from dataset.chat import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def token_logps(logits: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(labels[t] | prefix) in fp32 [B, T], zero where masked, and the 0/1 mask [B, T].

    log p = logit[label] - logsumexp(logits). Low-precision logits are converted to fp32 one sequence at a time, so
    the fp32 copy of the [B, T, V] logits never exists all at once.
    """
    mask = labels != IGNORE_INDEX
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        logps = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    else:
        logps = torch.stack([torch.log_softmax(row.float(), dim=-1).gather(-1, row_index).squeeze(-1)
                             for row, row_index in zip(logits, index)])
    mask = mask.to(logps.dtype)
    return logps * mask, mask


def token_counts(labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of scored positions per sequence [B] (at least 1, so dividing by it is always safe)."""
    mask = labels != IGNORE_INDEX
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    return mask.sum(-1).clamp(min=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   average: bool = False) -> torch.Tensor:
    """log p(response | prompt) per sequence [B]: the sum of token log-probs over scored positions, or their mean."""
    logps, mask = token_logps(logits, labels, loss_mask)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A preference loss over a batch of (chosen, rejected) pairs: (mean loss, chosen rewards, rejected rewards).

    With h = (pc - rc) - (pr - rr), the policy's log-ratio margin over the reference:
      sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)   (eps = label_smoothing; 0 is DPO)
      ipo:     (h - 1 / (2 * beta)) ** 2
      simpo:   z = beta * (pc - pr) - simpo_gamma, then the sigmoid form on z; reference-free (ref args may be None)
    Rewards are beta * (policy - reference) (simpo: beta * policy), detached, for logging reward accuracy / margin.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type == "simpo":
        # SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward".
        logits = beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
        chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs the reference model's log-probs")
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        margin = chosen_ratio - rejected_ratio
        logits = beta * margin
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    if loss_type == "ipo":
        # IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences".
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid and simpo losses, not to ipo")
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        # DPO: Rafailov et al. 2023, "Direct Preference Optimization"; label smoothing is conservative DPO (cDPO,
        # Mitchell 2023): the preference label is taken as wrong with probability eps.
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def chosen_nll(policy_chosen_logps_avg: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per token of the chosen responses, the SFT term added with weight --rpo_alpha.

    RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (DPO + alpha * NLL on the chosen answer).
    Takes length-averaged log-probs so that long answers do not outweigh the preference term.
    """
    return -policy_chosen_logps_avg.mean()


def token_weights(labels: torch.Tensor, weighted_token_ids: list[int] | torch.Tensor,
                  weight: float) -> torch.Tensor:
    """Per-position weights [B, T]: `weight` where the label is one of `weighted_token_ids`, 1 elsewhere."""
    ids = torch.as_tensor(weighted_token_ids, device=labels.device)
    weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    return weights.masked_fill(torch.isin(labels, ids), weight)


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over positions with a label, each weighted, divided by the total weight: sum(w * nll) / sum(w).

    With no weights this is the usual mean token cross-entropy. Reasoning distillation (as in DeepSeek-R1-style
    distillation in MiniMind) puts extra weight on the `<think>` / `</think>` / `<answer>` / `</answer>` tokens so the
    model learns the output format early; see `token_weights`.
    """
    logps, mask = token_logps(logits, labels)
    if weights is not None:
        mask = mask * weights.to(mask.dtype)
    return -(logps * mask).sum() / mask.sum().clamp(min=1e-8)
