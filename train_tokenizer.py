"""Stage 0: train the byte-level BPE tokenizer on the pretraining text (dataset/tokenizer.py), check that held-out
text round-trips, report its compression (characters per token) on that text, and save it.

    python train_tokenizer.py                                  # the demo corpus, 6400 tokens
    python train_tokenizer.py --data_path my_text.jsonl --vocab_size 8000 --out_dir runs/my/tokenizer
"""

import argparse
import os
import sys
import time
from pathlib import Path

from dataset.errors import DataError, SkipCounter, SuspectCounter, exit_cleanly_on_bad_input
from dataset.formats import iter_records
from dataset.tokenizer import SPECIAL_BLOCK_SIZE, round_trip_failures, save_tokenizer, train_bpe


def read_texts(path: str, max_chars: int | None, skip_bad: bool) -> tuple[list[str], int, str]:
    """Pretraining texts from path, stopping once max_chars characters are read; returns texts, chars, and the
    report of what was skipped (and of suspect texts, kept: a NUL character, as the pretraining bins count them)."""
    skipped, suspect = SkipCounter(), SuspectCounter()
    texts, chars = [], 0
    for record in iter_records(path, "pretrain", skip_bad, skipped, suspect):
        texts.append(record["text"])
        chars += len(record["text"])
        if max_chars is not None and chars >= max_chars:
            break
    if not texts:  # every line was skipped
        raise DataError(path, 0, f"no usable text; {skipped.summary()}")
    return texts, chars, skipped.summary() + (f"; {suspect.summary()}" if suspect.total else "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, each flag's default after its meaning (as trainer.cli's, which imports torch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as trainer.cli.Parser
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def at_least(low: int):
    """argparse type: an integer >= low (said in the error as trainer.cli.at_least says it)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: int >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: int >= {low}")
        return value
    return parse


DEMO_DATA, DEMO_VAL = "dataset/demo/pretrain.jsonl", "dataset/demo/pretrain_val.jsonl"
VAL_SPLIT = 0.02  # with the user's data and no --val_data_path: the share of its lines held out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--data_path", default=DEMO_DATA, help='training text: JSONL with a "text" field')
    parser.add_argument(
        "--val_data_path",
        help=f"held-out text for chars/token and the round-trip check (default: {DEMO_VAL} with the "
             f"demo data; with your own --data_path, the last {VAL_SPLIT:.0%}% of the lines read from it, not "
             "trained on; '' for none)",
    )
    parser.add_argument("--out_dir", default="out/tokenizer", help="where tokenizer.json and its configs go")
    parser.add_argument("--vocab_size", type=at_least(256 + SPECIAL_BLOCK_SIZE), default=6400,
                        help=f"tokens in the vocabulary: 256 bytes, {SPECIAL_BLOCK_SIZE} special tokens, the rest "
                             "learned merges")
    # Held-out compression stops improving after a few million characters while training time grows linearly with
    # them (docs/performance.md: "Tokenizer training and token bins").
    parser.add_argument("--max_chars", type=at_least(1), default=5_000_000,
                        help="train on at most this many characters")
    parser.add_argument("--skip_bad", action="store_true", help="skip malformed lines instead of stopping")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    own_data = os.path.normpath(args.data_path) != os.path.normpath(DEMO_DATA)
    if args.val_data_path is None:
        args.val_data_path = None if own_data else DEMO_VAL
        args.val_split = VAL_SPLIT if own_data else 0.0
    else:
        args.val_split = 0.0
    return args


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    texts, chars, skip_report = read_texts(args.data_path, args.max_chars, args.skip_bad)
    # Read before training, so that a bad held-out line stops the run at once, not after the training.
    held_out = read_texts(args.val_data_path, None, args.skip_bad) if args.val_data_path else None
    held_out_from = args.val_data_path
    if args.val_split and len(texts) > 1:  # the user's own text: the last lines read are held out, not trained on
        k = max(1, round(len(texts) * args.val_split))
        texts, val_texts = texts[:-k], texts[-k:]
        val_chars = sum(map(len, val_texts))
        chars -= val_chars
        held_out = (val_texts, val_chars, f"the last {k} of the {len(texts) + k:,} lines read, not trained on")
        held_out_from = args.data_path
    tokenizer = train_bpe(texts, args.vocab_size)
    seconds = time.perf_counter() - start

    print(f"tokenizer      {args.out_dir}")
    print(f"vocab size     {len(tokenizer)} (asked {args.vocab_size}; ids 0-{SPECIAL_BLOCK_SIZE - 1} special)")
    print(f"training text  {chars:,} chars in {len(texts):,} lines from {args.data_path} ({skip_report})")
    print(f"time           {seconds:.1f} s")
    if held_out:
        val_texts, val_chars, val_skip_report = held_out
        failures, val_tokens = round_trip_failures(tokenizer, val_texts)
        print(f"held-out text  {val_chars:,} chars in {len(val_texts):,} lines from {held_out_from} "
              f"({val_skip_report})")
        print(f"compression    {val_chars / max(val_tokens, 1):.2f} chars/token")
        print(f"round trip     {len(val_texts) - len(failures):,}/{len(val_texts):,} lines decode(encode(x)) == x")
        if failures:
            examples = "\n".join(repr(text[:200]) for text in failures[:5])
            raise SystemExit(f"{len(failures)} held-out lines do not round-trip; tokenizer not saved:\n{examples}")
    else:
        print("held-out text  none (--val_data_path ''): no compression figure or round-trip check")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, args.out_dir)
    print(f"saved          {args.out_dir} (load with dataset.tokenizer.load_tokenizer)")


@exit_cleanly_on_bad_input
def main() -> None:
    train(parse_args())


if __name__ == "__main__":
    main()
