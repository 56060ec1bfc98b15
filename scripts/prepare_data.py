"""Tokenize a pretraining file once, in parallel, into a uint16 token file that training memory-maps
(dataset/bins.py; train_pretrain.py does the same step itself before training).

    python -m scripts.prepare_data --data_path pretrain.jsonl --tokenizer_dir out/tokenizer --bin_dir out/bins
"""

import argparse

from dataset.bins import prepare_bins
from dataset.errors import exit_cleanly_on_bad_input


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, each flag's default after its meaning (none for required and on/off flags)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


@exit_cleanly_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_path", required=True, help="a .jsonl, .json (array) or .parquet file of {\"text\"}")
    parser.add_argument("--tokenizer_dir", required=True, help="directory holding tokenizer.json")
    parser.add_argument("--bin_dir", default="out/bins",
                        help="where the .bin and .json index go (train_pretrain.py looks in bins/ beside its "
                             "--out_dir, or its own --bin_dir)")
    parser.add_argument("--num_workers", type=int, default=0, help="tokenizer processes (0: min(4, CPUs))")
    parser.add_argument("--skip_bad", action="store_true", help="skip and count malformed lines instead of stopping")
    args = parser.parse_args()
    prepare_bins(args.data_path, args.tokenizer_dir, args.bin_dir, args.num_workers, args.skip_bad)


if __name__ == "__main__":
    main()
