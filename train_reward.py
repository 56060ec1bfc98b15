"""Reward model: learn a score for answers from preference pairs, as the critic RL optimises against.

    python train_reward.py                                     # the demo: out/sft + a scalar head on the demo pairs
    python train_reward.py --margin 0.5 --center_rewards 0.01  # a required gap; rewards kept near 0
    torchrun --nproc_per_node 4 train_reward.py ...            # DDP, same flags

Data: preference pairs in any shape train_dpo.py reads. Model: the SFT checkpoint's decoder with a new scalar head
(model/heads.py) read at the last real token of prompt + answer. Loss: Bradley-Terry, -logsigmoid(r_chosen -
r_rejected - margin), plus --center_rewards * mean((r_chosen + r_rejected)^2) (trainer/losses.py). The metric that
matters is held-out pair accuracy (val_accuracy: the share of held-out pairs scored chosen > rejected).

The directory it writes is a transformers LlamaForSequenceClassification (num_labels 1, pad token set):

    AutoModelForSequenceClassification.from_pretrained("out/reward")(input_ids).logits[:, 0]   # the scores

and `train_grpo.py --reward_model out/reward` / `train_ppo.py --reward_model out/reward` score rollouts with it.
"""

import functools

import torch

from dataset.chat import load_tokenizer
from dataset.lm_dataset import DPODataset, collate_dpo
from model import LM
from model.heads import ScalarModel, last_token_index
from trainer import (
    TrainConfig,
    UsageError,
    exit_cleanly_on_bad_input,
    format_summary,
    parse_args,
    require_vocab_fits,
    setup,
    teardown,
    train,
)
from trainer.losses import bradley_terry_loss

DEMO = dict(data_path="dataset/demo/dpo.jsonl", val_data_path="dataset/demo/dpo_eval.jsonl", batch_size=16,
            learning_rate=5e-5, warmup_steps=20, eval_every=100, save_every=200)


def add_flags(p):
    p.add_argument("--margin", type=float, default=0.0,
                   help="how far the chosen answer's score must exceed the rejected one's before the loss lets go")
    p.add_argument("--center_rewards", type=float, default=0.0,
                   help="weight of mean((r_chosen + r_rejected)^2), which keeps scores centred on 0 (TRL uses 0.01)")


def make_loss_fn(args, pad_token_id: int):
    """loss_fn(model, batch) -> (Bradley-Terry loss, pair accuracy and score metrics). The batch holds B chosen rows
    then B rejected rows (collate_dpo); each is scored at its last non-pad token, as transformers scores it."""

    def loss_fn(model, batch: dict):
        input_ids = batch["input_ids"]
        values = model(input_ids)  # right padding: causal attention keeps pads out of real positions
        scores = values[torch.arange(len(values), device=values.device), last_token_index(input_ids, pad_token_id)]
        chosen, rejected = scores.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, args.margin, args.center_rewards)
        return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean().detach(),
                      "chosen_score": chosen.mean().detach(), "rejected_score": rejected.mean().detach()}

    return loss_fn


@exit_cleanly_on_bad_input
def main():
    args = parse_args("reward", DEMO, add_flags)
    if args.margin < 0 or args.center_rewards < 0:
        raise UsageError("--margin and --center_rewards must be 0 or more")
    run = setup(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train_data = DPODataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad)
    val_data = DPODataset(args.val_data_path, tokenizer, args.max_seq_len, args.skip_bad) if args.val_data_path \
        else None
    lm = LM.from_pretrained(args.init_from)
    require_vocab_fits(lm, tokenizer, args.tokenizer_dir)
    model = ScalarModel.from_causal_lm(lm)
    del lm
    if train_data.pad_id != model.config.pad_token_id:
        raise UsageError(f"the tokenizer's pad id {train_data.pad_id} is not the model's ({model.config.pad_token_id})"
                         f"; use the tokenizer {args.init_from} was trained with")
    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"reward model: {n_params / 1e6:.2f}M parameters, decoder from {args.init_from} + a new scalar head | "
              f"margin {args.margin}, center_rewards {args.center_rewards} | data: {len(train_data):,} pairs, "
              f"{len(val_data or []):,} held out | {run.device} {str(run.dtype).split('.')[-1]} x "
              f"{run.world_size} process(es)")
    summary = train(model, train_data, make_loss_fn(args, model.config.pad_token_id), run,
                    TrainConfig.from_args(args), val_data=val_data,
                    collate_fn=functools.partial(collate_dpo, pad_id=train_data.pad_id), tokenizer=tokenizer,
                    perplexity=False)
    run.print(format_summary(summary))
    if "val_accuracy" in summary:
        run.print(f"   held-out pair accuracy {summary['val_accuracy']:.3f} (chosen scored above rejected; margin "
                  f"{summary['val_margin']:.3f})")
    teardown(run)


if __name__ == "__main__":
    main()
