"""Losses for the SFT, DPO, distillation, reward-model, GRPO and PPO stages, as functions of tensors (label_logps
alone runs the model: it asks for logits where there are labels only).

Conventions: `labels[b, t]` is the target token for position t of `logits[b, t]` — the caller has already shifted
(`logits[:, :-1]` against `input_ids[:, 1:]`) — and positions whose label is IGNORE_INDEX (-100) count for
nothing.

How a preference stage puts them together (policy and reference run on the same chosen / rejected batch):

    chosen_logps, _ = label_logps(policy, input_ids_c, labels_c)
    chosen_sum, chosen_count = chosen_logps.sum(-1), token_counts(labels_c)
    loss, chosen_r, rejected_r = dpo_loss(chosen_sum, rejected_sum, ref_chosen_sum, ref_rejected_sum, beta)
    loss = loss + rpo_alpha * chosen_nll(chosen_sum / chosen_count)      # optional, --rpo_alpha > 0

`sigmoid` takes summed log-probs; `ipo` and `simpo` are meant for length-averaged ones (sum / count), as their papers
and TRL use them. `token_logps` gives both from one log-softmax.
"""

import torch
import torch.nn.functional as F

from dataset.chat import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "simpo")
DENSE_SHARE = 0.25  # label_logps runs the whole output layer when more than this share of positions is scored
LOGPS_CHUNK = 256  # positions per fp32 log-softmax in token_logps (a few MB: faster than one large one on CPU)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(labels[t] | prefix) in fp32 [B, T], zero where masked, and the 0/1 mask [B, T].

    log p = logit[label] - logsumexp(logits). Low-precision logits are converted to fp32 LOGPS_CHUNK positions of a
    row at a time, so the fp32 copy of the [B, T, V] logits never exists all at once.
    """
    mask = labels != IGNORE_INDEX
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        logps = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    else:
        logps = torch.stack([
            torch.cat([torch.log_softmax(piece.float(), dim=-1).gather(-1, at).squeeze(-1)
                       for piece, at in zip(row.split(LOGPS_CHUNK), row_index.split(LOGPS_CHUNK))])
            for row, row_index in zip(logits, index)])
    mask = mask.to(logps.dtype)
    return logps * mask, mask


def label_logps(model, input_ids: torch.Tensor, labels: torch.Tensor,
                **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps(model(input_ids, **inputs).logits, labels), with the output layer run only where there is a label.

    The [B, T, V] logits are much of a small model's work per token (the demo's: 224 x 6400 = 1.4M multiply-adds
    against 1.6M for its 3 layers), and an answer or a response is often a small part of its row, so the model returns
    logits at the labelled positions alone (`logits_at`) and their log-probs are put back in place: [B, T] in fp32,
    zero where unlabelled, and the 0/1 mask.
    """
    mask = labels != IGNORE_INDEX
    # Many positions scored (SFT with --prompt_loss_weight, distillation's traces at ~50%, perplexity): the whole
    # output layer is as fast, and on CPU a number of selected rows that varies from batch to batch cost memory
    # (the demo's distillation: 2.1 GB peak against 1.3). LoRA's answers are 2-8% of their rows, DPO's ~15%.
    if mask.float().mean() > DENSE_SHARE:
        return token_logps(model(input_ids, **inputs).logits, labels)
    return logps_at(model(input_ids, logits_at=mask, **inputs).logits, labels, mask)


def logps_at(logits: torch.Tensor, labels: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps of logits [N, V] taken at the N positions where `at` [B, T] is True (LM.forward's logits_at), put
    back in place: [B, T] in fp32, zero elsewhere, and `at` as the 0/1 mask."""
    logps, _ = token_logps(logits[None], labels[at][None])  # the N positions as one row
    placed = torch.zeros(labels.shape, dtype=logps.dtype, device=logps.device).masked_scatter(at, logps[0])
    return placed, at.to(logps.dtype)


def token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of scored positions per sequence [B] (at least 1, so dividing by it is always safe)."""
    return (labels != IGNORE_INDEX).sum(-1).clamp(min=1)


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


# ---------------------------------------------------------------------------------------------------------------------
# Reward models, GRPO and PPO. Per-token tensors are [B, T] and aligned with `labels` (token_logps' output); `mask` is
# 1.0 on the completion tokens that count and 0.0 elsewhere (prompt, padding, masked completions).

POLICY_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float | torch.Tensor = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """The reward-model loss on pairs: mean of -logsigmoid(r_chosen - r_rejected - margin), plus
    center_coef * mean((r_chosen + r_rejected)^2), which keeps the rewards centred on 0 (Eisenstein et al. 2023, as
    TRL's center_rewards_coefficient). Bradley-Terry: p(chosen preferred) = sigmoid(r_chosen - r_rejected)."""
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, DeepSeekMath): rewards [N * G], prompt i's G completions at rows i*G ...
    i*G+G-1; each reward minus its group's mean, divided by (the group's std + 1e-4) when `scale` (std as torch.std
    computes it, with Bessel's correction). Dr. GRPO (Liu et al. 2025) drops the division: scale=False."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale and group_size < 2:
        raise ValueError("the group std needs at least 2 completions per prompt (or scale=False)")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.flatten()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probs (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1, unbiased and never negative. GRPO adds beta times it to the loss."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2,
                        clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017): -min(ratio * A, clip(ratio, 1 - clip_low,
    1 + clip_high) * A) with ratio = exp(logps - old_logps); `advantages` broadcasts ([B, 1] per sequence or [B, T]
    per token). clip_high > clip_low is DAPO's clip-higher (default: equal). Returns the per-token loss [B, T] and
    where the clip is active (the clipped term is the smaller one and the gradient is zero) as 0/1 [B, T]."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    is_clipped = ((ratio < 1 - clip_low) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
    return -torch.min(unclipped, clipped), is_clipped.to(logps.dtype)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
                   max_completion_length: int | None = None) -> torch.Tensor:
    """A batch's policy loss from per-token losses, as TRL's GRPOTrainer aggregates them:
      grpo:    mean over sequences of each sequence's token mean (a short answer's tokens weigh more)
      dr_grpo: sum over all tokens / (sequences * max_completion_length), a constant normaliser (Dr. GRPO)
      dapo:    sum over all tokens / number of tokens, every token weighing the same (DAPO, Yu et al. 2025)
    """
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo divides by max_completion_length; give it")
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {POLICY_LOSS_TYPES}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1 (0.0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor | None = None,
           var: torch.Tensor | None = None) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) on the mask, 0 elsewhere: PPO's advantage whitening. mean and var default to
    the masked mean and (unbiased) variance of `values`; pass them to whiten with statistics of a larger batch."""
    if mean is None or var is None:
        count = mask.sum()
        mean = masked_mean(values, mask)
        var = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens: rewards, values, mask [B, T],
    mask 1 on response tokens (right-padded). delta_t = r_t + gamma * V_{t+1} - V_t, with the value after the last
    response token taken as 0; A_t = delta_t + gamma * lam * A_{t+1}; zero outside the mask. Returns (advantages,
    returns), returns = advantages + values on the mask (the value loss's targets)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss: 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = old_V + clip(V - old_V,
    -clip, clip), so one update cannot move a value far from the one the rollout saw. Returns the loss and the share
    of tokens where the clipped term was the larger one."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution [B, T], in fp32: logsumexp(z) - sum(softmax(z) * z)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
