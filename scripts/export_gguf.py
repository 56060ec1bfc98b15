"""Export a checkpoint to a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

    python -m scripts.export_gguf --model out/sft --out out/sft.gguf [--lora out/lora] [--outtype f16|q8_0]
    llama-cli -m out/sft.gguf -cnv                 # llama.cpp: chat with the ChatML template in the file
    cd out && ollama create danlu-sft -f Modelfile && ollama run danlu-sft
"""

import argparse
import sys
from pathlib import Path

from serving.gguf import OUTTYPES, export_gguf, write_modelfile
from serving.loading import LoadError, load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="the .gguf file to write (a Modelfile is written beside it)")
    p.add_argument("--lora", help="LoRA adapter directory, merged into the exported weights")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f32",
                   help="matrix precision (norms stay f32); f32 decodes exactly as danlu does, q8_0 (llama.cpp's "
                        "8-bit blocks) is about a quarter of its size")
    p.add_argument("--name", help="general.name in the file (default: the directory name)")
    args = p.parse_args(argv)
    try:
        loaded = load(args.model, args.lora, device="cpu")
    except (LoadError, FileNotFoundError) as exc:
        print(f"export_gguf: {exc}", file=sys.stderr)
        return 2
    tokenizer_dir = args.lora if args.lora and (Path(args.lora) / "tokenizer.json").is_file() else args.model
    try:
        summary = export_gguf(loaded.model, loaded.tokenizer, tokenizer_dir, args.out, args.name or loaded.name,
                              args.outtype)
    except ValueError as exc:
        print(f"export_gguf: {exc}", file=sys.stderr)
        return 2
    generation = loaded.model.generation_config
    modelfile = write_modelfile(args.out, generation.temperature or 0.7, generation.top_p or 0.9,
                                loaded.context_length)
    print(f"wrote {summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {summary['tensors']} tensors, "
          f"{summary['vocab']} tokens, pre-tokenizer {summary['pre_tokenizer']}) and {modelfile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
