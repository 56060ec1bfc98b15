"""Can a short phase of copying grow induction heads before pretraining? (docs/demo_experiments.md, "Copying")

    python -m docs.copy_phase out/copy_phase                  # the demo model on repeated random spans, saved
    python train_pretrain.py --init_from out/copy_phase --out_dir out/pretrain_copy --max_steps 360 --eval_every 0
    python -m docs.copy_probe out/pretrain out/pretrain_copy  # does the copying survive pretraining?

Each row is BOS and then spans of random tokens, each followed by itself, to --row_tokens tokens; a span is
--min_span to --max_span tokens long. Nothing but the first copy predicts the second, so the loss on the repeats falls
from log(vocab) ~8.8 nats towards 0 once the model copies; the loss on the first copies stays at ~8.8. With spans of
one length (--min_span = --max_span) a head that looks back a fixed distance copies them: a shortcut, not the
induction heads (Olsson et al. 2022) that find an earlier occurrence by its content, which spans of varying length
need. The saved directory holds the tokenizer of --tokenizer_dir, so train_pretrain.py's --init_from reads it.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from dataset.tokenizer import BOS_ID, load_tokenizer, save_tokenizer
from model import LM, LMConfig
from trainer.optim import build_optimizer, lr_at

FIRST_ID = 100  # random tokens from here up, past the special and byte tokens


def repeated_spans(rows: int, args: argparse.Namespace, vocab_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of BOS + (span, span)*, cut to args.row_tokens + 1 ids, and the mask of the positions in a repeat."""
    ids, repeats = [], []
    for _ in range(rows):
        row, in_repeat = [BOS_ID], [False]
        while len(row) <= args.row_tokens:
            length = int(torch.randint(args.min_span, args.max_span + 1, (), generator=generator))
            span = torch.randint(FIRST_ID, vocab_size, (length,), generator=generator).tolist()
            row += span + span
            in_repeat += [False] * length + [True] * length
        ids.append(row[: args.row_tokens + 1])
        repeats.append(in_repeat[: args.row_tokens + 1])
    return torch.tensor(ids), torch.tensor(repeats)


def losses(model: LM, ids: torch.Tensor, in_repeat: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Mean loss over all positions (to train on), and over the first copies and the repeats (to print)."""
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(ids).logits[:, :-1].float()
    per_token = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    repeat = in_repeat[:, 1:]
    return per_token.mean(), per_token[~repeat].mean().item(), per_token[repeat].mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--tokenizer_dir", default="out/tokenizer")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--row_tokens", type=int, default=128)
    p.add_argument("--min_span", type=int, default=8)
    p.add_argument("--max_span", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=4e-3, help="AdamW's (embeddings, norms); a tenth at the end")
    p.add_argument("--muon_lr", type=float, default=0.04, help="the decoder matrices' (Muon)")
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = LM(LMConfig.from_preset("demo"))
    optimizer = build_optimizer(model, args.learning_rate, 0.1, torch.device("cpu"), optimizer="muon",
                                muon_lr=args.muon_lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    held_out = repeated_spans(64, args, model.config.vocab_size, generator)
    start = time.monotonic()
    for step in range(args.steps + 1):
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                _, first, repeat = losses(model, *held_out)
            print(f"step {step:4d}: held-out loss on the first copies {first:.2f}, on the repeats {repeat:.2f} nats "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        for group in optimizer.param_groups:  # Muon's groups scale this by --muon_lr / --learning_rate
            group["lr"] = lr_at(step, args.steps, args.learning_rate, args.learning_rate / 10, args.warmup_steps)
        loss, _, _ = losses(model, *repeated_spans(args.batch_size, args, model.config.vocab_size, generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(args.out_dir)
    save_tokenizer(load_tokenizer(args.tokenizer_dir), args.out_dir)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
