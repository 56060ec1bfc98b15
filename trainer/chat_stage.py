"""What the chat stages (SFT, LoRA, reasoning distillation) share: packed chat data, the previous stage's model,
the assistant-token loss, and `run_chat_stage`, which wires them into `train()`.

A chat stage script is then its flags, its loss (or its change to the model), and one call:

    run_chat_stage(args)                                        # SFT (with --teacher: knowledge distillation)
    run_chat_stage(args, make_loss=tag_weighted(args))          # distillation: another loss
    run_chat_stage(args, adapt_model=add_adapters, export_fn=save_adapter)   # LoRA: another model
"""

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from dataset.chat import IGNORE_INDEX
from dataset.errors import UsageError
from dataset.lm_dataset import SFTDataset
from dataset.prepared import once_per_node
from dataset.tokenizer import load_tokenizer
from model import LM

from .cli import between, require_vocab_fits
from .config import TrainConfig
from .kd import distillation
from .loop import train
from .losses import label_logps
from .progress import format_summary
from .runtime import Runtime, setup, teardown
from .sampling import make_sample_fn


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every chat stage's data."""
    p.add_argument("--system_prompt_ratio", type=between(0, 1), default=0.0,
                   help="share of conversations without a system turn that get a random one")
    p.add_argument("--no_pack", action="store_true", help="one conversation per row, padded (for comparison)")
    p.add_argument("--prompt_loss_weight", type=between(0, 1), default=0.0,
                   help="loss weight of the prompt's tokens (system and user turns, template headers) against the "
                        "answer's 1: 0 trains on answers only; a little keeps the language model (the demo: 0.1)")


def packed_logits(model, batch: dict) -> torch.Tensor:
    """Logits of a batch of packed rows: each conversation attends only to itself, positions restart per one."""
    return model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"]).logits


def assistant_loss(model, batch: dict, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens (labels are already the next tokens, IGNORE_INDEX elsewhere); with
    weights [B, T] (default: the batch's loss_weights under --prompt_loss_weight) sum(w * nll) / sum(w). The
    output layer runs only at the scored positions (trainer/losses.py's label_logps)."""
    logps, mask = label_logps(model, batch["input_ids"], batch["labels"], segment_ids=batch["segment_ids"],
                              position_ids=batch["position_ids"])
    weights = batch.get("loss_weights") if weights is None else weights
    if weights is not None:
        mask = mask * weights.to(mask.dtype)
    return -(logps * mask).sum() / mask.sum().clamp(min=1e-8)


def assistant_tokens(batch: dict) -> torch.Tensor:
    """What assistant_loss averages over, the number of assistant tokens (or the weights' sum): the trainer weighs
    micro-batches and ranks by it."""
    scored = batch["labels"] != IGNORE_INDEX
    return scored.sum() if "loss_weights" not in batch else batch["loss_weights"][scored].sum()


def chat_rows(path: str, args: argparse.Namespace, tokenizer, run: Runtime, system_prompt_ratio: float = 0.0,
              pack: bool = True, prompt_loss_weight: float = 0.0) -> SFTDataset:
    """The chats of `path` as rows of --max_seq_len tokens, prepared once per node into the `prepared` folder beside
    --out_dir (dataset/prepared.py); only rank 0 prints their stats."""
    return once_per_node(lambda: SFTDataset(
        path, tokenizer, args.max_seq_len, skip_bad=args.skip_bad, system_prompt_ratio=system_prompt_ratio,
        seed=args.seed, pack=pack, quiet=not run.is_main, cache_dir=Path(args.out_dir).parent / "prepared",
        prompt_loss_weight=prompt_loss_weight), run.local_rank, run.barrier)


def chat_data(args: argparse.Namespace, tokenizer, run: Runtime) -> tuple[SFTDataset, SFTDataset | None]:
    """The train and (optional) validation datasets of chat rows (packed unless --no_pack). Validation scores the
    answers alone whatever --prompt_loss_weight is, so val loss compares across runs."""
    train_data = chat_rows(args.data_path, args, tokenizer, run, args.system_prompt_ratio, pack=not args.no_pack,
                           prompt_loss_weight=args.prompt_loss_weight)
    val_data = chat_rows(args.val_data_path, args, tokenizer, run, pack=not args.no_pack) if args.val_data_path \
        else None
    return train_data, val_data


def load_checkpoint(args: argparse.Namespace, tokenizer, run: Runtime) -> LM:
    """The previous stage's model (--init_from), checked against the tokenizer, with a one-line description."""
    model = LM.from_pretrained(args.init_from)
    require_vocab_fits(model, tokenizer, args.tokenizer_dir)
    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"model: {n_params / 1e6:.2f}M parameters from {args.init_from} | {run.device} "
              f"{str(run.dtype).split('.')[-1]} x {run.world_size} process(es)")
    return model


LossMaker = Callable[[object, Runtime], tuple[Callable, Callable]]


def run_chat_stage(args: argparse.Namespace, make_loss: LossMaker | None = None,
                   adapt_model: Callable[[LM, Runtime], None] | None = None,
                   export_fn: Callable | None = None) -> dict:
    """Everything a chat stage does: load data and model, train, report. Returns train()'s summary.

    `make_loss(tokenizer, run)` gives (loss_fn(model, batch), loss_items(batch)), the total weight loss_fn's mean
    is over (default: assistant_loss over assistant_tokens). `adapt_model(model, run)` changes the loaded model in
    place before training (LoRA adds its adapters); `export_fn(model, dir)` writes the output directory.
    """
    run = setup(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train_data, val_data = chat_data(args, tokenizer, run)
    model = load_checkpoint(args, tokenizer, run)
    if adapt_model is not None:
        adapt_model(model, run)
    loss_fn, loss_items = make_loss(tokenizer, run) if make_loss else (assistant_loss, assistant_tokens)
    if getattr(args, "teacher", None):  # --teacher (trainer/kd.py): CE and KL on the same assistant tokens
        if make_loss is not None:
            raise UsageError(f"{args.stage}: --teacher replaces the assistant cross-entropy, not a stage's own loss")
        if args.prompt_loss_weight:
            raise UsageError(f"{args.stage}: --teacher distils on the answers; it takes no --prompt_loss_weight")
        loss_fn = distillation(args, model, tokenizer, run, packed_logits)
    sample_fn = make_sample_fn(tokenizer, args.sample_prompt, chat=True, max_new_tokens=args.sample_tokens,
                               autocast=run.autocast)
    summary = train(model, train_data, loss_fn, run, TrainConfig.from_args(args), val_data=val_data,
                    tokenizer=tokenizer, sample_fn=sample_fn, export_fn=export_fn, loss_items=loss_items)
    run.print(format_summary(summary))
    teardown(run)
    return summary
