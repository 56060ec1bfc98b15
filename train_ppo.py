"""PPO: actor-critic reinforcement learning, the RLHF recipe of InstructGPT (Ouyang et al. 2022).

    python train_ppo.py --data_path prompts.jsonl --init_from out/distill --reward_model out/reward
    python train_ppo.py ... --reward_funcs task --critic_from policy              # checkable rewards, no reward model
    torchrun --nproc_per_node 4 train_ppo.py ...                                  # prompts and rollouts sharded

Data and rewards: as train_grpo.py (RL prompts; --reward_funcs from evals/ and/or --reward_model, weighted).

Models: the policy (actor) starts from --init_from; the critic is a second decoder with a scalar head
(model/heads.py) giving a value per position, initialised from the policy's decoder or from the reward model
(--critic_from); the reference is a frozen copy of the starting policy. Actor and critic train together (one
optimizer, one loss): pg_loss + --vf_coef * value_loss.

Each step (trainer/rl.py): --batch_size prompts per process, --group_size answers each; per answer token the reward
is -beta * (log p_policy - log p_reference) (a KL penalty that keeps the policy near where it started), plus the
answer's score on its last token; GAE (--gamma, --lam) turns rewards and the critic's values into advantages and
returns (trainer/losses.py); advantages are whitened over the whole batch (all ranks); then --ppo_epochs passes of
--num_mini_batches updates of the clipped policy loss and the clipped value loss, averaged over answer tokens.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

from dataset.chat import IGNORE_INDEX
from model.heads import ScalarModel
from trainer import TrainConfig, UsageError, exit_cleanly_on_bad_input, format_summary, parse_args, setup, teardown
from trainer.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    masked_mean,
    token_entropy,
    token_logps,
    whiten,
)
from trainer.rl import RLConfig, chunked, train_rl
from trainer.rl_stage import (
    add_rl_flags,
    build_rewards,
    check_rl_args,
    chunked_logps,
    format_held_out,
    frozen_reference,
    load_policy_and_prompts,
    load_replay,
)

DEFAULTS = dict(data_path="dataset/demo/rl.jsonl", val_data_path="dataset/demo/rl_eval.jsonl",
                batch_size=8, max_seq_len=512, learning_rate=1e-5, warmup_steps=10, weight_decay=0.0, log_every=1,
                eval_every=50, save_every=50, sample_every=10, max_steps=0)


def add_flags(p) -> None:
    add_rl_flags(p, group_size=1, beta=0.05)
    p.add_argument("--critic_from", choices=("policy", "reward_model"), default="policy",
                   help="initialise the critic's decoder from the policy or from --reward_model (head included)")
    p.add_argument("--vf_coef", type=float, default=0.1, help="weight of the value loss")
    p.add_argument("--cliprange_value", type=float, default=0.2, help="how far one update may move a value")
    p.add_argument("--gamma", type=float, default=1.0, help="discount per token")
    p.add_argument("--lam", type=float, default=0.95, help="GAE's lambda: bias (0) against variance (1)")
    p.add_argument("--no_whiten", action="store_true", help="use the advantages as GAE gives them")


class ActorCritic(nn.Module):
    """The policy and the critic as one trained module (one optimizer, one DDP wrapper, one train state)."""

    def __init__(self, policy: nn.Module, critic: ScalarModel):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, T, V] and values [B, T] (right padding: no mask needed)."""
        return self.policy(input_ids).logits, self.critic(input_ids)


def export_policy(model: ActorCritic, out_dir: str) -> None:
    """The directory holds the policy, a transformers Llama (the critic lives in train_state/ for --resume)."""
    model.policy.save_pretrained(out_dir)


def global_moments(values: torch.Tensor, mask: torch.Tensor, run) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of values on the mask, over every rank's batch."""
    sums = torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()]).double()
    if run.distributed:
        dist.all_reduce(sums)
    total, squares, count = sums
    mean = total / count.clamp(min=1)
    var = (squares - count * mean ** 2) / (count - 1).clamp(min=1)
    return mean.to(values.dtype), var.clamp(min=0).to(values.dtype)


class PPO:
    """KL-penalised token rewards, GAE, whitened advantages, clipped policy and value losses (trainer/rl.py's
    Algorithm)."""

    def __init__(self, args, reference: nn.Module | None):
        self.args, self.reference = args, reference

    def policy(self, model: ActorCritic) -> nn.Module:
        return model.policy

    @torch.no_grad()
    def prepare(self, model: ActorCritic, batch: dict, run) -> dict[str, float]:
        a, rows = self.args, self.args.micro_batch_size
        mask = (batch["labels"] != IGNORE_INDEX).float()
        old_logps = chunked_logps(model.policy, rows)(batch)
        values = chunked(lambda b: model.critic(b["input_ids"]), batch, rows) * mask
        rewards = torch.zeros_like(old_logps)
        kl = torch.zeros_like(old_logps)
        if self.reference is not None:
            kl = (old_logps - chunked_logps(self.reference, rows)(batch)) * mask  # log-ratio of the sampled tokens
            rewards = -a.beta * kl
        has_answer = mask.any(-1)
        last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)  # each answer's last token
        row = torch.arange(len(mask), device=mask.device)
        rewards[row[has_answer], last[has_answer]] += batch["rewards"][has_answer]
        advantages, returns = gae_advantages(rewards, values, mask, a.gamma, a.lam)
        if not a.no_whiten:
            advantages = whiten(advantages, mask, *global_moments(advantages, mask, run))
        batch.update(old_logps=old_logps, old_values=values, advantages=advantages, returns=returns)
        answers = has_answer.float().sum().clamp(min=1)
        return {"kl": float(kl.sum() / answers), "value": float(masked_mean(values, mask)),
                "returns": float(masked_mean(returns, mask))}

    def loss(self, model, batch: dict):
        a = self.args
        logits, values = model(batch["input_ids"])
        logps, mask = token_logps(logits, batch["labels"])
        per_token, clipped = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], a.clip_eps,
                                                 a.clip_eps_high)
        pg_loss = masked_mean(per_token, mask)
        value_loss, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                       a.cliprange_value)
        return pg_loss + a.vf_coef * value_loss, {
            "pg_loss": pg_loss.detach(), "value_loss": value_loss.detach(), "clip_frac": masked_mean(clipped, mask),
            "value_clip_frac": value_clipped, "entropy": masked_mean(token_entropy(logits.detach()), mask)}

    def loss_items(self, batch: dict):
        """Both losses are means over answer tokens."""
        return (batch["labels"] != IGNORE_INDEX).sum()


def build_critic(args, policy) -> ScalarModel:
    if args.critic_from == "reward_model":
        if not args.reward_model:
            raise UsageError("--critic_from reward_model needs --reward_model DIR")
        return ScalarModel.from_pretrained(args.reward_model)
    return ScalarModel.from_causal_lm(copy.deepcopy(policy))


@exit_cleanly_on_bad_input
def main():
    args = parse_args("ppo", DEFAULTS, add_flags)
    check_rl_args(args)
    run = setup(args)
    tokenizer, policy, prompts, val_prompts = load_policy_and_prompts(args, run)
    rewards = build_rewards(args, tokenizer, prompts + (val_prompts or []), run.device, run.print)
    reference = frozen_reference(policy, args.beta, run.device)
    critic = build_critic(args, policy)
    model = ActorCritic(policy, critic)
    run.print(f"actor: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters from {args.init_from} | "
              f"critic: {sum(p.numel() for p in critic.parameters()) / 1e6:.2f}M from the "
              f"{'policy' if args.critic_from == 'policy' else 'reward model'} | reference: "
              f"{'frozen copy, KL penalty ' + str(args.beta) if reference else 'none (beta 0)'} | gamma {args.gamma}, "
              f"lam {args.lam}, vf_coef {args.vf_coef}, {args.ppo_epochs} x {args.num_mini_batches} updates per "
              f"rollout batch | {len(prompts):,} prompts, {len(val_prompts or []):,} held out | {run.device} "
              f"{str(run.dtype).split('.')[-1]} x {run.world_size} process(es)")
    summary = train_rl(model, prompts, rewards, PPO(args, reference), run, TrainConfig.from_args(args),
                       RLConfig.from_args(args), val_prompts=val_prompts, tokenizer=tokenizer, export_fn=export_policy,
                       replay=load_replay(args, tokenizer, run, policy, reference))
    run.print(format_summary(summary))
    if held_out := format_held_out(summary):
        run.print(held_out)
    teardown(run)


if __name__ == "__main__":
    main()
