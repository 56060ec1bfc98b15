"""Stage 0: train the byte-level BPE tokenizer on the pretraining text (dataset/tokenizer.py), check that held-out
text round-trips, and save it.

    python train_tokenizer.py --data_path dataset/demo/pretrain.jsonl --vocab_size 6400
"""

import argparse
import time
from pathlib import Path

from dataset.errors import DataError, SkipCounter, exit_cleanly_on_bad_input
from dataset.formats import iter_records
from dataset.tokenizer import SPECIAL_BLOCK_SIZE, round_trip_failures, save_tokenizer, train_bpe


def read_texts(path: str, max_chars: int | None, skip_bad: bool) -> tuple[list[str], int, str]:
    """Pretraining texts from path, stopping once max_chars characters are read; returns texts, chars, skip report."""
    skipped = SkipCounter()
    texts, chars = [], 0
    for record in iter_records(path, "pretrain", skip_bad, skipped):
        texts.append(record["text"])
        chars += len(record["text"])
        if max_chars is not None and chars >= max_chars:
            break
    if not texts:  # every line was skipped
        raise DataError(path, 0, f"no usable text; {skipped.summary()}")
    return texts, chars, skipped.summary()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="dataset/demo/pretrain.jsonl", help='JSONL with a "text" field')
    parser.add_argument(
        "--val_data_path",
        default="dataset/demo/pretrain_val.jsonl",
        help="held-out text for chars/token and the round-trip check ('' to skip)",
    )
    parser.add_argument("--out_dir", default="out/tokenizer")
    parser.add_argument("--vocab_size", type=int, default=6400)
    # Held-out compression stops improving after a few million characters while training time grows linearly with
    # them (docs/performance.md: "Tokenizer training and token bins").
    parser.add_argument("--max_chars", type=int, default=5_000_000, help="train on at most this many characters")
    parser.add_argument("--skip_bad", action="store_true", help="skip malformed lines instead of stopping")
    return parser.parse_args()


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    texts, chars, skip_report = read_texts(args.data_path, args.max_chars, args.skip_bad)
    # Read before training, so that a bad held-out line stops the run at once, not after the training.
    held_out = read_texts(args.val_data_path, None, args.skip_bad) if args.val_data_path else None
    tokenizer = train_bpe(texts, args.vocab_size)
    seconds = time.perf_counter() - start

    print(f"tokenizer      {args.out_dir}")
    print(f"vocab size     {len(tokenizer)} (asked {args.vocab_size}; ids 0-{SPECIAL_BLOCK_SIZE - 1} special)")
    print(f"training text  {chars:,} chars in {len(texts):,} lines from {args.data_path} ({skip_report})")
    print(f"time           {seconds:.1f} s")
    if held_out:
        val_texts, val_chars, val_skip_report = held_out
        failures, val_tokens = round_trip_failures(tokenizer, val_texts)
        print(f"held-out text  {val_chars:,} chars in {len(val_texts):,} lines ({val_skip_report})")
        print(f"compression    {val_chars / max(val_tokens, 1):.2f} chars/token")
        print(f"round trip     {len(val_texts) - len(failures):,}/{len(val_texts):,} lines decode(encode(x)) == x")
        if failures:
            examples = "\n".join(repr(text[:200]) for text in failures[:5])
            raise SystemExit(f"{len(failures)} held-out lines do not round-trip; tokenizer not saved:\n{examples}")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, args.out_dir)
    print(f"saved          {args.out_dir} (load with dataset.tokenizer.load_tokenizer)")


@exit_cleanly_on_bad_input
def main() -> None:
    train(parse_args())


if __name__ == "__main__":
    main()
