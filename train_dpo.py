"""DPO: teach the SFT model to prefer the chosen answer of each preference pair over the rejected one.

    python train_dpo.py                                        # the demo: out/sft on the demo preference pairs
    python train_dpo.py --loss_type simpo --beta 2.0           # reference-free, length-normalised (SimPO)
    python train_dpo.py --precompute_ref                       # score the reference once, then drop it
    torchrun --nproc_per_node 4 train_dpo.py ...               # DDP, same flags

Data: preference pairs (MiniMind {"chosen","rejected"} message lists, {"prompt","chosen","rejected"} or
{"question","response_chosen","response_rejected"}). Each pair is one batch row for prompt + chosen and one for
prompt + rejected, scored in a single forward pass; only the response tokens count.

Models: the policy starts from --init_from and is trained; the reference is a frozen copy of the same checkpoint
(DPO's implicit reward is beta * log(policy / reference)). --precompute_ref scores every pair with the reference
once before training and keeps only those numbers, which halves the memory and the forward passes per step.
SimPO needs no reference at all.

Why the defaults are conservative (beta 0.1, learning rate 2e-5, one epoch, --rpo_alpha 0.5): DPO only pushes the
margin between chosen and rejected apart, and a small model finds the cheap way to do it: push the rejected
answers' probability down and let the chosen ones sink too, until it falls into a few stock phrases repeated over
and over (the demo's rejected answers include such loops on purpose). A small learning rate over one pass is enough
to separate the pairs; the SFT term on the chosen answers (RPO, --rpo_alpha) keeps them likely, so held-out
preference accuracy rises without costing task accuracy or adding repetition. Raise beta to stay closer to the
reference; set --rpo_alpha 0 for plain DPO.
"""

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from dataset.chat import load_tokenizer
from dataset.lm_dataset import DPODataset, collate_dpo
from dataset.prepared import once_per_node
from model import LM
from trainer import (
    Runtime,
    TrainConfig,
    UsageError,
    above,
    at_least,
    between,
    exit_cleanly_on_bad_input,
    format_summary,
    make_sample_fn,
    parse_args,
    require_vocab_fits,
    setup,
    teardown,
    train,
)
from trainer.data import move_to
from trainer.fsdp import shard_model
from trainer.losses import LOSS_TYPES, chosen_nll, dpo_loss, label_logps, token_counts

DEMO = dict(data_path="dataset/demo/dpo.jsonl", val_data_path="dataset/demo/dpo_eval.jsonl",
            batch_size=8, learning_rate=2e-5, warmup_steps=20, eval_every=100, sample_every=100, save_every=200,
            sample_prompt="判断这条评论的情感倾向（正面/负面）：东西收到了，做工很粗糙，和图片差太多了。")


def add_flags(p):
    p.add_argument("--beta", type=above(0), default=0.1,
                   help="strength of the pull towards the reference (SimPO: reward scale, try 2.0)")
    p.add_argument("--loss_type", choices=LOSS_TYPES, default="sigmoid",
                   help="sigmoid: DPO; ipo: IPO; simpo: reference-free, length-normalised SimPO")
    p.add_argument("--label_smoothing", type=between(0, 0.5, high_open=True), default=0.0,
                   help="probability that a preference label is wrong (conservative DPO; sigmoid and simpo)")
    p.add_argument("--simpo_gamma", type=float, default=0.5, help="SimPO's target reward margin")
    p.add_argument("--rpo_alpha", type=at_least(0, float), default=0.5,
                   help="weight of the SFT loss on the chosen answers, added to the preference loss (0: off)")
    p.add_argument("--precompute_ref", action="store_true",
                   help="score all pairs with the reference once before training instead of keeping it in memory")


def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(response | prompt) summed over each row's response tokens [2B], and each row's response length [2B]."""
    # right padding: causal attention keeps pads out of real positions; the output layer runs on responses only
    logps, _ = label_logps(model, batch["input_ids"], batch["labels"])
    return logps.sum(-1), token_counts(batch["labels"])


def scored(sums: torch.Tensor, counts: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The log-probs a loss type compares: sums for DPO, per-token means for IPO and SimPO (trainer/losses.py)."""
    return sums if loss_type == "sigmoid" else sums / counts


@torch.no_grad()
def precompute_reference_logps(model, dataset: DPODataset, run: Runtime, loss_type: str, batch_size: int) -> None:
    """Score every pair with `model` (the untrained policy, i.e. the reference) and attach the scores to `dataset`.

    Each rank scores its own share of the pairs and an all-reduce gives every rank the full table, indexed by the
    pair's position in the dataset, so any batch on any rank finds its own pairs' reference log-probs.
    """
    was_training = model.training
    model.eval()
    table = torch.zeros(2, len(dataset), device=run.device)
    share = Subset(dataset, range(run.rank, len(dataset), run.world_size))
    loader = DataLoader(share, batch_size=batch_size, collate_fn=functools.partial(collate_dpo, pad_id=dataset.pad_id))
    for batch in loader:
        batch = move_to(batch, run.device)
        with run.autocast():
            chosen, rejected = scored(*response_logps(model, batch), loss_type).float().chunk(2)
        table[0, batch["index"]], table[1, batch["index"]] = chosen, rejected
    if run.distributed:
        dist.all_reduce(table)
    model.train(was_training)
    dataset.set_reference_logps(table[0], table[1])


def make_loss_fn(args, reference: LM | None) -> Callable:
    """loss_fn(model, batch) -> (preference loss [+ rpo_alpha * chosen NLL], reward metrics).

    Reference log-probs come from the batch when they were precomputed, else from `reference` run on the same batch
    on this rank; SimPO uses none.
    """

    def reference_logps(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if reference is None:
            return None, None
        with torch.no_grad():
            return scored(*response_logps(reference, batch), args.loss_type).chunk(2)

    def loss_fn(model, batch: dict):
        sums, counts = response_logps(model, batch)
        chosen, rejected = scored(sums, counts, args.loss_type).chunk(2)
        ref_chosen, ref_rejected = reference_logps(batch)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta,
                                                          args.loss_type, args.label_smoothing, args.simpo_gamma)
        if args.rpo_alpha > 0:
            loss = loss + args.rpo_alpha * chosen_nll((sums / counts).chunk(2)[0])
        return loss, {"reward_acc": (chosen_rewards > rejected_rewards).float().mean(),
                      "margin": (chosen_rewards - rejected_rewards).mean(),
                      "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean()}

    return loss_fn


def reward_report(summary: dict, out_dir: str) -> str:
    """The preference metrics of the last training window and of the final validation pass."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    last = next((row for row in reversed(rows) if "reward_acc" in row), None)
    lines = []
    for name, values, prefix in (("train (last log window)", last, ""), ("held out", summary, "val_")):
        if values and f"{prefix}reward_acc" in values:
            lines.append(f"   {name}: reward accuracy {values[f'{prefix}reward_acc']:.3f}  margin "
                         f"{values[f'{prefix}margin']:.3f}  chosen {values[f'{prefix}chosen_reward']:.3f}  "
                         f"rejected {values[f'{prefix}rejected_reward']:.3f}")
    return "\n".join(lines)


@exit_cleanly_on_bad_input
def main():
    args = parse_args("dpo", DEMO, add_flags)
    if args.loss_type == "ipo" and args.label_smoothing:
        raise UsageError("--label_smoothing applies to --loss_type sigmoid and simpo, not ipo")
    run = setup(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    def pairs(path: str) -> DPODataset:  # prepared once per node, beside --out_dir (dataset/prepared.py)
        return once_per_node(lambda: DPODataset(path, tokenizer, args.max_seq_len, args.skip_bad, quiet=not run.is_main,
                                                cache_dir=Path(args.out_dir).parent / "prepared", seed=args.seed),
                             run.local_rank, run.barrier)

    train_data = pairs(args.data_path)
    val_data = pairs(args.val_data_path) if args.val_data_path else None

    policy = LM.from_pretrained(args.init_from)
    require_vocab_fits(policy, tokenizer, args.tokenizer_dir)
    reference = None
    if args.loss_type == "simpo":
        reference_mode = "none (SimPO is reference-free)"
    elif args.precompute_ref:
        policy.to(run.device)
        for data in (train_data, val_data):
            if data is not None:
                precompute_reference_logps(policy, data, run, args.loss_type, args.batch_size)
        reference_mode = f"precomputed for {len(train_data) + len(val_data or []):,} pairs, model dropped"
    else:
        reference = copy.deepcopy(policy).to(run.device).eval().requires_grad_(False)
        reference_mode = f"frozen copy of {args.init_from}"
        if args.fsdp and run.distributed:
            shard_model(reference)  # like the policy: each rank keeps 1/world_size of it
            reference_mode += ", sharded"
    n_params = sum(p.numel() for p in policy.parameters())
    truncated = train_data.n_truncated + (val_data.n_truncated if val_data else 0)
    run.print(f"model: {n_params / 1e6:.2f}M parameters from {args.init_from} | reference: {reference_mode} | "
              f"loss: {args.loss_type}, beta {args.beta}, rpo_alpha {args.rpo_alpha} | data: {len(train_data):,} "
              f"pairs, {len(val_data or []):,} held out, {truncated} sequences cut to {args.max_seq_len} tokens | "
              f"{run.device} {str(run.dtype).split('.')[-1]} x {run.world_size} process(es)")

    sample_fn = make_sample_fn(tokenizer, args.sample_prompt, chat=True, max_new_tokens=args.sample_tokens,
                               autocast=run.autocast)
    summary = train(policy, train_data, make_loss_fn(args, reference), run, TrainConfig.from_args(args),
                    val_data=val_data, collate_fn=functools.partial(collate_dpo, pad_id=train_data.pad_id),
                    tokenizer=tokenizer, sample_fn=sample_fn, perplexity=False)
    run.print(format_summary(summary))
    if run.is_main:
        run.print(reward_report(summary, args.out_dir))
    teardown(run)


if __name__ == "__main__":
    main()
