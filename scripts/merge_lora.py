"""Fold a LoRA adapter into its base model and write a plain checkpoint that any Llama reader loads.

    python -m scripts.merge_lora --init_from out/sft --lora out/lora --out_dir out/lora_merged

The base must be the model the adapter was trained on (adapter_config.json's base_model_name_or_path): another
base gives a model that is neither, so it is refused unless --force.
"""

import json
import os
from pathlib import Path

from dataset.errors import UsageError, exit_cleanly_on_bad_input
from model.lora import merge_adapter
from trainer.cli import Parser, require_checkpoint, same_path


def adapter_base(adapter_dir: str) -> str | None:
    """The base an adapter names (adapter_config.json's base_model_name_or_path); None when it names none."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"--lora {adapter_dir} is not a LoRA adapter directory (no adapter_config.json); "
                         "train one with `python train_lora.py`")
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") or None
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is unreadable: {err}") from None


def check_merge(init_from: str, lora: str, out_dir: str, force: bool = False) -> str:
    """Refuse a merge that would write into the base or the adapter, or fold the adapter onto another base than
    its own (unless `force`). Returns a note for the user ("" when all is as expected)."""
    require_checkpoint(init_from)
    base = adapter_base(lora)
    for name, path in (("--init_from", init_from), ("--lora", lora)):
        if same_path(out_dir, path):
            raise UsageError(f"--out_dir {out_dir} is the {name} directory; the merged model needs its own --out_dir")
    if base is None:
        return f"note: {lora} names no base model; merged onto {init_from} unchecked"
    same = same_path(base, init_from) if os.path.exists(base) else os.path.normpath(base) == os.path.normpath(init_from)
    if same:
        return ""
    if not force:
        raise UsageError(f"--lora {lora} was trained on {base} (its adapter_config.json), not on --init_from "
                         f"{init_from}; merge it onto {base}, or pass --force to merge onto {init_from} anyway")
    return f"warning: --force: {lora} was trained on {base}; merged onto {init_from} as asked"


@exit_cleanly_on_bad_input
def main() -> None:
    parser = Parser(description=__doc__)
    parser.add_argument("--init_from", required=True, help="base checkpoint directory the adapter was trained on")
    parser.add_argument("--lora", required=True,
                        help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--out_dir", required=True, help="where to write the merged checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="merge even when --init_from is not the base the adapter names")
    args = parser.parse_args()
    note = check_merge(args.init_from, args.lora, args.out_dir, args.force)
    if note:
        print(note)
    out = merge_adapter(args.init_from, args.lora, args.out_dir)
    print(f"merged {args.lora} into {args.init_from} -> {out}")


if __name__ == "__main__":
    main()
