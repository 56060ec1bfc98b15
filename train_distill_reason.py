"""Reasoning distillation: SFT on R1-style traces, <think>steps</think> then <answer>answer</answer>.

    python train_distill_reason.py                             # the demo: out/dpo (or out/sft) -> out/distill
    python train_distill_reason.py --data_path r1_mix_1024.jsonl --max_seq_len 1024 --tag_weight 2

The data, the packing and the loss are SFT's (trainer/chat_stage.py); what differs is the weights: the tag tokens
`<think>`, `</think>`, `<answer>`, `</answer>` count --tag_weight times as much as other assistant tokens (they are
added to --token_weight's), so the model learns the output format early, as R1-distillation recipes (and MiniMind's
train_distill_reason.py) do. A tokenizer without some of the tags (MiniMind's has only the think tags) weights those
it has. Validation, as SFT's, scores every answer token alike.

The demo mixes earlier chats back in (replay, `--data_path a.jsonl:0.8,b.jsonl:0.2`: a fifth of the chats):
trained on traces alone, the model forgot the sentiment task (held-out accuracy 0.77 after DPO, 0.08 after this
stage); a fifth of SFT's chats kept it, but not DPO's preference (held-out preference accuracy 0.973 -> 0.847: SFT's
chats teach the three answer styles DPO chose one of). A fifth of DPO's pairs, read as chats of their chosen answers,
keeps both (0.953; sentiment 0.787 -> 0.783). Pretraining documents, 13% of the items (weight 0.15), keep the news
perplexity where the DPO model had it, with --replay_kl 20 (on their tokens, the KL to the DPO model's next-token
distribution): measured against the DPO model on the same held-out documents (eval_model.py's paired changes),
+1.5 [+0.5, +2.5] and -0.7 [-1.5, +0.1] on two seeds, against +17.5 and +15.9 with weight 0.05 at --replay_kl 10, the
format 0.996 / 0.994 (docs/demo_experiments.md: the news perplexity, paired). The demo does not train on the prompts
here (--prompt_loss_weight, as SFT does): they end in one fixed instruction, and at 0.2 the distilled model wrote it
into its answers. docs/demo_experiments.md has the figures.
"""

import os
from pathlib import Path

from dataset.tokenizer import load_tokenizer
from trainer import above, exit_cleanly_on_bad_input, parse_args
from trainer.chat_stage import add_chat_flags, run_chat_stage

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def add_flags(p):
    add_chat_flags(p)
    p.add_argument("--tag_weight", type=above(0), default=2.0,
                   help="loss weight of the <think>/</think>/<answer>/</answer> tokens (1: plain SFT)")


def tag_weights(tokenizer, tag_weight: float) -> list[tuple[str, float]]:
    """--tag_weight as --token_weight pairs: the tags that are single tokens of this tokenizer, at that weight."""
    vocab = tokenizer.get_vocab()
    return [(tag, tag_weight) for tag in TAGS if tag in vocab] if tag_weight != 1 else []


@exit_cleanly_on_bad_input
def main():
    # Start from the DPO model when there is one, else from SFT.
    default_init = "out/dpo" if Path("out/dpo/config.json").is_file() else "out/sft"
    demo = dict(data_path="dataset/demo/reason.jsonl:0.8,dataset/demo/dpo.jsonl:0.2,"
                          "dataset/demo/pretrain.jsonl:0.15", val_data_path="dataset/demo/reason_eval.jsonl")
    args = parse_args("distill", dict(**demo, init_from=default_init, max_seq_len=384, batch_size=16,
                                     learning_rate=2e-4, warmup_steps=30, eval_every=200, sample_every=200,
                                     sample_prompt="小明有15个苹果，吃了3个，又买了2袋，每袋4个，现在有几个？",
                                     sample_tokens=64, save_every=200),
                      add_flags)
    if args.init_from == default_init == "out/sft" and os.environ.get("RANK", "0") == "0":
        print("no DPO checkpoint in out/dpo: starting from out/sft")
    # The tags are answer tokens that count more, as --token_weight's are (SFTDataset's loss_weights).
    tokenizer = load_tokenizer(args.tokenizer_dir)
    args.token_weight = tag_weights(tokenizer, args.tag_weight) + args.token_weight
    if os.environ.get("RANK", "0") == "0":
        missing = [tag for tag in TAGS if tag not in tokenizer.get_vocab()]
        print(f"tag weight {args.tag_weight} on {len(TAGS) - len(missing)} tag tokens"
              + (f" (the tokenizer has no {', '.join(missing)} token)" if missing else ""))
    run_chat_stage(args)


if __name__ == "__main__":
    main()
