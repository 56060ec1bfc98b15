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

import copy

import torch

from dataset.chat import IGNORE_INDEX, load_tokenizer
from evals import TASKS
from evals.base import Task
from model import LM
from model.heads import ScalarModel
from trainer import (
    TrainConfig,
    UsageError,
    exit_cleanly_on_bad_input,
    format_summary,
    parse_args,
    require_checkpoint,
    require_vocab_fits,
    setup,
    teardown,
)
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
from trainer.rl import Prompt, Reward, RLConfig, chunked, load_prompts, train_rl

DEFAULTS = dict(batch_size=4, max_seq_len=512, learning_rate=2e-5, warmup_steps=10, weight_decay=0.0, log_every=1,
                eval_every=50, save_every=50, sample_every=10, max_steps=0)
REWARD_FUNCS = ("task", "think_format", "repetition", "length")


def add_rl_flags(p, group_size: int, beta: float) -> None:
    """The flags GRPO and PPO share: sampling, updates per rollout batch, rewards."""
    p.add_argument("--group_size", "--num_generations", type=int, default=group_size,
                   help="sampled answers per prompt")
    p.add_argument("--max_new_tokens", type=int, default=96, help="answer budget per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--ppo_epochs", "--num_iterations", type=int, default=2,
                   help="passes over each batch of rollouts (more than one update: the ratio and the clip act)")
    p.add_argument("--num_mini_batches", type=int, default=2, help="optimizer steps per pass")
    p.add_argument("--micro_batch_size", type=int, default=16, help="rows per forward/backward")
    p.add_argument("--clip_eps", type=float, default=0.2, help="the ratio is clipped to [1 - eps, 1 + eps_high]")
    p.add_argument("--clip_eps_high", type=float, default=None, help="upper clip (default: --clip_eps; DAPO: 0.28)")
    p.add_argument("--beta", type=float, default=beta,
                   help="weight of the KL to the frozen starting model (0: no reference model at all)")
    p.add_argument("--mask_truncated", action="store_true",
                   help="answers cut at --max_new_tokens count for nothing in the loss")
    p.add_argument("--reward_funcs", default="task",
                   help=f"comma-separated, from {', '.join(REWARD_FUNCS)} (task: each prompt's task from evals/; "
                        "length: DAPO's soft penalty near the budget); empty for none")
    p.add_argument("--reward_model", help="a train_reward.py directory whose score is one more reward")
    p.add_argument("--reward_weights", help="one weight per reward (the reward model last); default all 1")
    p.add_argument("--overlong_buffer", type=int, default=0,
                   help="length reward: 0 up to max_new_tokens - buffer, then down to -1 at the budget "
                        "(default: a quarter of max_new_tokens)")


def add_flags(p) -> None:
    add_rl_flags(p, group_size=8, beta=0.04)
    p.add_argument("--loss_type", choices=POLICY_LOSS_TYPES, default="dapo",
                   help="grpo: per-answer mean; dr_grpo: constant normaliser, no std scaling; dapo: token mean")
    p.add_argument("--scale_rewards", choices=("auto", "yes", "no"), default="auto",
                   help="divide advantages by the group's std (auto: yes except for dr_grpo)")


def task_of(name: str | None) -> Task | None:
    """The task of evals/ a record's "task" field names (by its record_task, else its name)."""
    for task in TASKS.values():
        if name is not None and name in (getattr(task, "record_task", None), task.name):
            return task if hasattr(task, "reward") else None
    return None


def build_rewards(args, tokenizer, prompts: list[Prompt], device: torch.device, run_print=print) -> list[Reward]:
    """The weighted reward functions --reward_funcs / --reward_model / --reward_weights name."""
    names = [n.strip() for n in (args.reward_funcs or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise UsageError(f"--reward_funcs: unknown {', '.join(unknown)}; choose from {', '.join(REWARD_FUNCS)}")
    if not names and not args.reward_model:
        raise UsageError("no reward: give --reward_funcs and/or --reward_model")
    if "task" in names:
        missing = sorted({str(p.record["meta"].get("task")) for p in prompts if task_of(p.record["meta"].get("task"))
                          is None})
        if missing and not args.reward_model:
            raise UsageError(f"prompts of task(s) {', '.join(missing)} have no reward function in evals/ (tasks: "
                             f"{', '.join(t.name for t in TASKS.values())}); give them a \"task\" field or add "
                             "--reward_model")

    def texts(completions) -> list[str]:
        return [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]

    def task_reward(prompts, completions):
        out = []
        for prompt, text in zip(prompts, texts(completions)):
            task = task_of(prompt.record["meta"].get("task"))
            out.append(task.reward(text, prompt.record) if task is not None else 0.0)
        return out

    budget = args.max_new_tokens
    buffer = args.overlong_buffer or max(1, budget // 4)

    def length_reward(prompts, completions):  # DAPO's soft overlong punishment
        return [min(0.0, (budget - buffer - len(c.tokens)) / buffer) for c in completions]

    functions = {
        "task": task_reward,
        "think_format": lambda prompts, completions: [TASKS["think_format"].reward(t) for t in texts(completions)],
        "repetition": lambda prompts, completions: [TASKS["repetition"].reward(t) for t in texts(completions)],
        "length": length_reward,
    }
    rewards = [Reward(name, functions[name]) for name in names]
    if args.reward_model:
        rewards.append(Reward("reward_model", reward_model_fn(args.reward_model, device)))
    if args.reward_weights:
        weights = [float(w) for w in args.reward_weights.split(",")]
        if len(weights) != len(rewards):
            raise UsageError(f"--reward_weights has {len(weights)} weights for {len(rewards)} rewards "
                             f"({', '.join(r.name for r in rewards)})")
        for reward, weight in zip(rewards, weights):
            reward.weight = weight
    run_print("rewards: " + " + ".join(f"{r.weight:g} x {r.name}" for r in rewards))
    return rewards


def reward_model_fn(path: str, device: torch.device, batch_rows: int = 32):
    """A reward function scoring prompt + answer with a reward model (model/heads.py), frozen."""
    require_checkpoint(path, "python train_reward.py")
    model = ScalarModel.from_pretrained(path).to(device).eval().requires_grad_(False)
    pad = model.config.pad_token_id

    @torch.no_grad()
    def fn(prompts, completions):
        scores = []
        sequences = [p.ids + c.tokens for p, c in zip(prompts, completions)]
        for start in range(0, len(sequences), batch_rows):
            chunk = sequences[start:start + batch_rows]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
            scores += model.sequence_scores(ids).tolist()
        return scores

    return fn


def frozen_reference(policy: LM, beta: float, device: torch.device) -> LM | None:
    """A frozen copy of the starting policy when beta > 0 (else None: no reference kept)."""
    return copy.deepcopy(policy).to(device).eval().requires_grad_(False) if beta > 0 else None


def sequence_logps(model, rows_per_chunk: int):
    """fn(batch) -> the log-probs [N, L] of the batch's labels under `model`, computed in chunks of rows."""
    def fn(batch):
        return chunked(lambda b: token_logps(model(b["input_ids"]).logits, b["labels"])[0], batch, rows_per_chunk)
    return fn


class GRPO:
    """Group-relative advantages and the clipped token loss (trainer/rl.py's Algorithm)."""

    def __init__(self, args, reference: LM | None):
        self.args, self.reference = args, reference
        self.scale = args.scale_rewards == "yes" or (args.scale_rewards == "auto" and args.loss_type != "dr_grpo")

    def policy(self, model):
        return model

    @torch.no_grad()
    def prepare(self, model, batch: dict, run) -> dict[str, float]:
        batch["advantages"] = group_advantages(batch["rewards"], self.args.group_size, self.scale)
        batch["old_logps"] = sequence_logps(model, self.args.micro_batch_size)(batch)
        if self.reference is not None:
            batch["ref_logps"] = sequence_logps(self.reference, self.args.micro_batch_size)(batch)
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


def check_rl_args(args) -> None:
    if args.group_size < 1 or args.max_new_tokens < 1 or args.ppo_epochs < 1 or args.num_mini_batches < 1:
        raise UsageError("--group_size, --max_new_tokens, --ppo_epochs and --num_mini_batches must be at least 1")
    if args.max_new_tokens >= args.max_seq_len:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in --max_seq_len "
                         f"{args.max_seq_len}")
    if args.beta < 0:
        raise UsageError("--beta must be 0 or more")
    if not args.data_path:
        raise UsageError("give --data_path: RL prompts as JSONL ({\"prompt\", \"task\", \"answer\"} or chats ending "
                         "with the user's turn); the demo corpus has no RL prompt file yet")


def load_policy_and_prompts(args, run):
    """The tokenizer, the starting policy, and the training / held-out prompts (tokenized in memory)."""
    tokenizer = load_tokenizer(args.tokenizer_dir)
    policy = LM.from_pretrained(args.init_from)
    require_vocab_fits(policy, tokenizer, args.tokenizer_dir)
    max_prompt = args.max_seq_len - args.max_new_tokens
    prompts = load_prompts(args.data_path, tokenizer, max_prompt, args.skip_bad, run.print)
    val = load_prompts(args.val_data_path, tokenizer, max_prompt, args.skip_bad, run.print) if args.val_data_path \
        else None
    return tokenizer, policy, prompts, val


@exit_cleanly_on_bad_input
def main():
    args = parse_args("grpo", DEFAULTS, add_flags)
    check_rl_args(args)
    if args.loss_type == "grpo" and args.group_size < 2:
        raise UsageError("GRPO's advantages need --group_size 2 or more")
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
                       RLConfig.from_args(args), val_prompts=val_prompts, tokenizer=tokenizer)
    run.print(format_summary(summary))
    if "val_reward" in summary:
        run.print(f"   held out: reward {summary['val_reward']:.3f}"
                  + (f"  pass@1 {summary['val_pass@1']:.3f}" if "val_pass@1" in summary else ""))
    teardown(run)


if __name__ == "__main__":
    main()
