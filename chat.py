"""Talk to a trained model in the terminal, the answer streaming as it is generated.

    python chat.py --model out/sft                    # a chat model: multi-turn, /help for the commands
    python chat.py --model out/sft --lora out/lora    # with a LoRA adapter merged in memory
    python chat.py --model out/pretrain               # a base model continues each line as raw text
    echo "你好" | python chat.py --model out/sft       # works on a pipe too

Commands: /reset, /system TEXT, /think on|off, /help, /quit. The oldest turns are dropped (and it says so) when
the conversation no longer fits the context window.
"""

import argparse
import logging
import sys

import torch

from serving.engine import Engine, SamplingParams
from serving.loading import LoadError, load
from serving.terminal import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--lora", help="LoRA adapter directory, merged into --model in memory")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--seed", type=int, help="make the samples repeatable")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="chat model or base model (auto: from args.json's stage, as eval_model.py decides)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        loaded = load(args.model, args.lora, args.device, None if args.chat == "auto" else args.chat == "yes")
    except (LoadError, FileNotFoundError) as exc:
        print(f"chat.py: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop_token_ids=tuple(loaded.stop_token_ids))
    engine = Engine(loaded.model, max_batch=1, max_context=loaded.context_length).start()
    try:
        return run(engine, loaded.tokenizer, loaded.is_chat, loaded.context_length, params, args.system)
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
