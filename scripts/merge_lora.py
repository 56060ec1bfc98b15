"""Fold a LoRA adapter into its base model and write a plain checkpoint that any Llama reader loads.

    python -m scripts.merge_lora --init_from out/sft --lora out/lora --out_dir out/lora_merged
"""

import argparse
import os
import shutil
from pathlib import Path

from model.lora import load_lora, merge_lora

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def merge_adapter(init_from: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  model_class=None) -> Path:
    """Load the base with `model_class.from_pretrained` (default: our LM), merge the adapter, save into out_dir.

    Tokenizer and generation files come from the adapter directory where it has them, else from the base.
    """
    if model_class is None:
        from model import LM
        model_class = LM
    model = model_class.from_pretrained(init_from)
    merge_lora(load_lora(model, adapter_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write everything into a sibling temp directory, then rename file by file: no half-written file in out_dir.
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            source = next((Path(d) / name for d in (adapter_dir, init_from) if (Path(d) / name).is_file()), None)
            if source is not None:
                shutil.copyfile(source, staging / name)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


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
