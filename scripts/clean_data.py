"""Clean a corpus before training: quality filters, exact and near-duplicate removal, and a report of what each step
removed with examples (dataset/clean.py).

    python -m scripts.clean_data --kind pretrain --data_path pretrain.jsonl --out pretrain.clean.jsonl --script cjk
    python -m scripts.clean_data --kind chat --data_path sft.jsonl --out sft.clean.jsonl

Writes OUT (the kept records as JSON lines) and OUT.report.json (counts, removed characters and samples per step).
"""

import argparse
from dataclasses import fields

from dataset.clean import SCRIPTS, CleanConfig, clean_file
from dataset.errors import exit_cleanly_on_bad_input


@exit_cleanly_on_bad_input
def main() -> None:
    defaults = CleanConfig()
    p = argparse.ArgumentParser(description="Filter and de-duplicate a pretraining or chat JSONL file.")
    p.add_argument("--kind", choices=("pretrain", "chat"), default="pretrain",
                   help="pretrain: {\"text\"} records; chat: conversations, judged on the assistant's text")
    p.add_argument("--data_path", required=True, help="a .jsonl, .json (array) or .parquet file")
    p.add_argument("--out", required=True, help="the cleaned JSONL file")
    p.add_argument("--report", help="where the JSON report goes (default: OUT.report.json)")
    p.add_argument("--min_chars", type=int, default=defaults.min_chars, help="shorter texts are removed")
    p.add_argument("--max_chars", type=int, default=defaults.max_chars, help="longer texts are removed")
    p.add_argument("--max_junk", type=float, default=defaults.max_junk,
                   help="largest share of control / private-use / U+FFFD characters")
    p.add_argument("--script", choices=sorted(SCRIPTS), help="expected script (e.g. cjk for Chinese); off if unset")
    p.add_argument("--min_script", type=float, default=defaults.min_script,
                   help="smallest share of letters in --script")
    p.add_argument("--max_repeated_lines", type=float, default=defaults.max_repeated_lines,
                   help="largest share of lines that repeat an earlier line")
    p.add_argument("--ngram", type=int, default=defaults.ngram, help="n of the repeated character n-gram filter")
    p.add_argument("--max_repeated_ngrams", type=float, default=defaults.max_repeated_ngrams,
                   help="largest share of character n-grams that occur more than once")
    p.add_argument("--near_threshold", type=float, default=defaults.near_threshold,
                   help="estimated Jaccard similarity (character 5-grams) at which a record is a near-duplicate")
    p.add_argument("--num_perm", type=int, default=defaults.num_perm, help="MinHash permutations")
    p.add_argument("--samples", type=int, default=defaults.samples, help="removed examples kept per step")
    p.add_argument("--skip_bad", action="store_true", help="skip and count malformed lines instead of stopping")
    args = p.parse_args()
    config = CleanConfig(**{f.name: getattr(args, f.name) for f in fields(CleanConfig)})
    clean_file(args.data_path, args.out, config, args.report)


if __name__ == "__main__":
    main()
