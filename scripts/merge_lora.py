"""Fold a LoRA adapter into its base model and write a plain checkpoint that any Llama reader loads.

    python -m scripts.merge_lora --init_from out/sft --lora out/lora --out_dir out/lora_merged
"""

import argparse

from model.lora import merge_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init_from", required=True, help="base checkpoint directory the adapter was trained on")
    parser.add_argument("--lora", required=True,
                        help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--out_dir", required=True, help="where to write the merged checkpoint")
    args = parser.parse_args()
    out = merge_adapter(args.init_from, args.lora, args.out_dir)
    print(f"merged {args.lora} into {args.init_from} -> {out}")


if __name__ == "__main__":
    main()
