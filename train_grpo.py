"""GRPO: reinforcement learning from checkable rewards, with the group of a prompt's own answers as the baseline.

    python train_grpo.py --data_path prompts.jsonl --init_from out/distill      # rewards from each prompt's task
    python train_grpo.py ... --reward_funcs task,think_format --reward_weights 1,0.5
    python train_grpo.py ... --reward_model out/reward                           # and/or a reward model's score
    python train_grpo.py ... --loss_type dr_grpo --beta 0                        # Dr. GRPO, no reference model
    torchrun --nproc_per_node 4 train_grpo.py ...                                # prompts and rollouts sharded

Data: RL prompts ({"prompt": str or [msgs], "task"?, "answer"?, ...} or a chat record whose last turn is the user's;
an evaluation file's reference answer is dropped). `task` names a task of evals/ (arith, sentiment, entity,
entity_reason, lora), whose reward function scores an answer against the record's fields (answer, label,
entities).

Each step (trainer/rl.py): --batch_size prompts per process, --group_size sampled answers each; the rewards
(--reward_funcs, weighted by --reward_weights, plus --reward_model) become advantages within each group, reward minus
the group's mean, divided by its std (Shao et al. 2024, DeepSeekMath; not with dr_grpo); then --ppo_epochs passes of
--num_mini_batches updates of the clipped objective, -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) per
answer token, plus --beta * KL(policy || reference) (k3 estimator) to the frozen starting model. --loss_type says
how token losses are averaged: grpo per answer then over answers, dr_grpo by a constant (answers x max_new_tokens),
dapo over all tokens (trainer/losses.py).
"""

import torch

from dataset.chat import IGNORE_INDEX
from trainer import TrainConfig, UsageError, exit_cleanly_on_bad_input, format_summary, parse_args, setup, teardown
from trainer.losses import (
    POLICY_LOSS_TYPES,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    masked_mean,
    token_entropy,
    token_logps,
)
from trainer.rl import RLConfig, train_rl
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
                batch_size=4, max_seq_len=512, learning_rate=2e-5, warmup_steps=10, weight_decay=0.0, log_every=1,
                eval_every=50, save_every=50, sample_every=10, max_steps=0)


def add_flags(p) -> None:
    add_rl_flags(p, group_size=8, beta=0.04)
    p.add_argument("--loss_type", choices=POLICY_LOSS_TYPES, default="dapo",
                   help="grpo: per-answer mean; dr_grpo: constant normaliser, no std scaling; dapo: token mean")
    p.add_argument("--scale_rewards", choices=("auto", "yes", "no"), default="auto",
                   help="divide advantages by the group's std (auto: yes except for dr_grpo)")


class GRPO:
    """Group-relative advantages and the clipped token loss (trainer/rl.py's Algorithm)."""

    def __init__(self, args, reference: torch.nn.Module | None):
        self.args, self.reference = args, reference
        self.scale = args.scale_rewards == "yes" or (args.scale_rewards == "auto" and args.loss_type != "dr_grpo")

    def policy(self, model):
        return model

    @torch.no_grad()
    def prepare(self, model, batch: dict, run) -> dict[str, float]:
        batch["advantages"] = group_advantages(batch["rewards"], self.args.group_size, self.scale)
        batch["old_logps"] = chunked_logps(model, self.args.micro_batch_size)(batch)
        if self.reference is not None:
            batch["ref_logps"] = chunked_logps(self.reference, self.args.micro_batch_size)(batch)
        return {}

    def loss(self, model, batch: dict):
        a = self.args
        logits = model(batch["input_ids"]).logits
        logps, mask = token_logps(logits, batch["labels"])
        per_token, clipped = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"][:, None], a.clip_eps,
                                                 a.clip_eps_high)
        extras = {}
        if self.reference is not None:
            kl = k3_kl(logps, batch["ref_logps"])
            per_token = per_token + a.beta * kl
            extras["kl"] = masked_mean(kl.detach(), mask)
        loss = aggregate_loss(per_token, mask, a.loss_type, a.max_new_tokens)
        extras["clip_frac"] = masked_mean(clipped, mask)
        extras["entropy"] = masked_mean(token_entropy(logits.detach()), mask)
        return loss, extras

    def loss_items(self, batch: dict):
        """dapo averages over tokens, grpo and dr_grpo over answers."""
        if self.args.loss_type == "dapo":
            return (batch["labels"] != IGNORE_INDEX).sum()
        return batch["labels"].shape[0]


@exit_cleanly_on_bad_input
def main():
    args = parse_args("grpo", DEFAULTS, add_flags)
    check_rl_args(args)
    if args.group_size < 2:
        raise UsageError("GRPO compares each prompt's answers with each other: give --group_size 2 or more")
    run = setup(args)
    tokenizer, policy, prompts, val_prompts = load_policy_and_prompts(args, run)
    rewards = build_rewards(args, tokenizer, prompts + (val_prompts or []), run.device, run.print)
    reference = frozen_reference(policy, args.beta, run.device)
    run.print(f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters from {args.init_from} | "
              f"reference: {'frozen copy, beta ' + str(args.beta) if reference else 'none (beta 0)'} | "
              f"{args.loss_type}, {args.group_size} answers per prompt, {args.ppo_epochs} x {args.num_mini_batches} "
              f"updates per rollout batch | {len(prompts):,} prompts, {len(val_prompts or []):,} held out | "
              f"{run.device} {str(run.dtype).split('.')[-1]} x {run.world_size} process(es)")
    summary = train_rl(policy, prompts, rewards, GRPO(args, reference), run, TrainConfig.from_args(args),
                       RLConfig.from_args(args), val_prompts=val_prompts, tokenizer=tokenizer,
                       replay=load_replay(args, tokenizer, run, policy, reference))
    run.print(format_summary(summary))
    if held_out := format_held_out(summary):
        run.print(held_out)
    teardown(run)


if __name__ == "__main__":
    main()
