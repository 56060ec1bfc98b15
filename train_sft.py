"""Supervised fine-tuning: teach the pretrained model to answer in chats, full-parameter.

    python train_sft.py                                        # the demo: out/pretrain -> out/sft
    python train_sft.py --data_path sft_mini_512.jsonl --init_from out/pretrain --max_seq_len 512
    torchrun --nproc_per_node 4 train_sft.py ...               # DDP, same flags

Data: chat JSONL in any shape dataset/formats.py reads (MiniMind, OpenAI, ShareGPT, Alpaca; reasoning_content,
tools and tool calls included), rendered with the ChatML template. The loss covers assistant tokens only: every
assistant turn of a conversation and its <|im_end|>. Conversations are tokenized once and packed several to a
row, each attending only to itself, so padding does not eat the batch.
"""

from collections.abc import Callable

import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from dataset.chat import load_tokenizer
from dataset.lm_dataset import IGNORE_INDEX, SFTDataset
from model import LM
from trainer import (
    Runtime,
    exit_cleanly_on_bad_input,
    format_summary,
    make_sample_fn,
    parse_args,
    require_vocab_fits,
    setup,
    teardown,
    train,
)


def add_flags(p):
    p.add_argument("--system_prompt_ratio", type=float, default=0.0,
                   help="share of conversations without a system turn that get a random one")
    p.add_argument("--no_pack", action="store_true", help="one conversation per row, padded (for comparison)")


def packed_logits(model, batch):
    """Logits of a batch of packed rows: each conversation attends only to itself, positions restart per one."""
    return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits


def loss_fn(model, batch):
    """Mean cross-entropy over assistant tokens (labels are already the next tokens, -100 elsewhere)."""
    logits = packed_logits(model, batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


def assistant_tokens(batch) -> int:
    """How many tokens loss_fn averages over: the trainer weighs micro-batches and ranks by it."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def build_sft_data(args, tokenizer, run) -> tuple[SFTDataset, SFTDataset | None]:
    """The train and (optional) validation datasets; only rank 0 prints their stats."""
    def dataset(path: str, ratio: float) -> SFTDataset:
        return SFTDataset(path, tokenizer, args.max_seq_len, skip_bad=args.skip_bad, system_prompt_ratio=ratio,
                          seed=args.seed, pack=not args.no_pack, quiet=not run.is_main)

    train_data = dataset(args.data_path, args.system_prompt_ratio)
    val_data = dataset(args.val_data_path, 0.0) if args.val_data_path else None
    return train_data, val_data


def load_model(args, tokenizer, run) -> LM:
    """The previous stage's model, checked against the tokenizer, with a one-line description."""
    model = LM.from_pretrained(args.init_from)
    require_vocab_fits(model, tokenizer, args.tokenizer_dir)
    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"model: {n_params / 1e6:.2f}M parameters from {args.init_from} | {run.device} "
              f"{str(run.dtype).split('.')[-1]} x {run.world_size} process(es)")
    return model


def run_chat_stage(args, make_loss_fn: Callable[[PreTrainedTokenizerFast, Runtime], tuple[Callable, Callable]]):
    """Everything an SFT-style stage does besides choosing its loss: load data and model, train, report.

    `make_loss_fn(tokenizer, run)` gives the stage's loss_fn(model, batch), which may depend on the tokenizer, and
    loss_items(batch), the total weight loss_fn's mean is taken over (see trainer.loop.loss_scales).
    """
    run = setup(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train_data, val_data = build_sft_data(args, tokenizer, run)
    model = load_model(args, tokenizer, run)
    sample_fn = make_sample_fn(tokenizer, args.sample_prompt, chat=True, max_new_tokens=args.sample_tokens,
                               autocast=run.autocast)
    loss_fn, loss_items = make_loss_fn(tokenizer, run)
    summary = train(model, train_data, loss_fn, run, val_data=val_data, tokenizer=tokenizer, sample_fn=sample_fn,
                    loss_items=loss_items)
    run.print(format_summary(summary))
    teardown(run)


@exit_cleanly_on_bad_input
def main():
    demo = dict(data_path="dataset/demo/sft.jsonl", val_data_path="dataset/demo/sft_eval.jsonl")
    args = parse_args("sft", dict(**demo, init_from="out/pretrain", max_seq_len=256, batch_size=16,
                                  learning_rate=5e-4, warmup_steps=50, eval_every=200, sample_every=200,
                                  sample_prompt="下面这条评论是正面的还是负面的？\n房间很干净，服务员也很热情，下次还会再来。",
                                  sample_tokens=32, save_every=200),
                      add_flags, init_from_hint="python train_pretrain.py")
    run_chat_stage(args, lambda tokenizer, run: (loss_fn, assistant_tokens))


if __name__ == "__main__":
    main()
