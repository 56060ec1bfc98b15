"""Prepare any stage's data by hand: tokenize once, in parallel, into the token files that training memory-maps
(the stages do the same step themselves before training, and find it done if you ran this first).

    python -m scripts.prepare_data --data_path pretrain.jsonl --tokenizer_dir out/tokenizer          # uint16 bins
    python -m scripts.prepare_data --stage sft --data_path sft.jsonl --tokenizer_dir out/tokenizer --max_seq_len 512
    python -m scripts.prepare_data --stage dpo --data_path dpo.jsonl --tokenizer_dir out/tokenizer
    python -m scripts.prepare_data --stage rl --data_path prompts.jsonl --tokenizer_dir out/tokenizer

pretrain writes dataset/bins.py's bins into --bin_dir (train_pretrain.py's --bin_dir); sft (also LoRA and
distillation), dpo and rl write dataset/prepared.py's files into --cache_dir, which is where a stage run with
--out_dir out/<stage> looks (`prepared` beside its --out_dir). For SFT, --max_seq_len, --system_prompt_ratio and
--seed must be the training run's: they change the tokens. `--data_path a.jsonl:0.7,b.jsonl:0.3` prepares each
weighted source.
"""

import argparse

from dataset.bins import prepare_bins
from dataset.errors import exit_cleanly_on_bad_input
from dataset.mixing import parse_data_path
from dataset.prepared import prepare
from dataset.tokenizer import load_tokenizer

STAGES = ("pretrain", "sft", "dpo", "rl")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help."""


@exit_cleanly_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default="pretrain",
                        help="pretrain: {\"text\"} into token bins; sft (LoRA, distillation): chat records; dpo: "
                             "preference pairs; rl: prompt sets")
    parser.add_argument("--data_path", required=True,
                        help="a .jsonl, .json (array) or .parquet file; comma-separate several, or weight them "
                             "(a.jsonl:0.7,b.jsonl:0.3)")
    parser.add_argument("--tokenizer_dir", required=True, help="directory holding tokenizer.json")
    parser.add_argument("--bin_dir", default="out/bins", help="pretrain: where the .bin and .json index go")
    parser.add_argument("--cache_dir", default="out/prepared",
                        help="sft, dpo, rl: where the prepared files go (a stage reads `prepared` beside --out_dir)")
    parser.add_argument("--max_seq_len", type=int, default=256, help="sft: where conversations are cut; sft, dpo: "
                                                                      "how much of a very long text is tokenized")
    parser.add_argument("--system_prompt_ratio", type=float, default=0.0, help="sft: as the training run's")
    parser.add_argument("--seed", type=int, default=42, help="sft with --system_prompt_ratio: as the training run's")
    parser.add_argument("--num_workers", type=int, default=0, help="tokenizer processes (0: min(4, CPUs))")
    parser.add_argument("--skip_bad", action="store_true", help="skip and count malformed lines instead of stopping")
    args = parser.parse_args()
    sources = parse_data_path(args.data_path)
    if args.stage == "pretrain":
        for path, _ in sources:
            prepare_bins(path, args.tokenizer_dir, args.bin_dir, args.num_workers, args.skip_bad)
        return
    tokenizer = load_tokenizer(args.tokenizer_dir)
    groups = [[path] for path, _ in sources] if sources[0][1] is not None else [[path for path, _ in sources]]
    for files in groups:
        prepare(files, args.stage, tokenizer, args.cache_dir, max_seq_len=args.max_seq_len, skip_bad=args.skip_bad,
                system_prompt_ratio=args.system_prompt_ratio, seed=args.seed, num_workers=args.num_workers)


if __name__ == "__main__":
    main()
