"""Two models served at once (serve.py --model a --model b): their engines on one thread (start_together, what
serve.py does), then a thread each (what it did before). Each round: 16 requests of 48 greedy tokens to the
second model, then three batches to the first; its tokens/s is what the second model's turn left it.

    python -m docs.engines_bench out/sft
"""

import sys

import torch

from docs.lora_bench import tokens_per_second
from model import LM
from serving.engine import Engine, start_together


def main(model_dir: str) -> None:
    torch.set_num_threads(2)
    for layout in ("one thread", "a thread each"):
        engines = [Engine(LM.from_pretrained(model_dir).eval()) for _ in range(2)]
        first, second = start_together(engines) if layout == "one thread" else [e.start() for e in engines]
        alone = [tokens_per_second(first, [0] * 16) for _ in range(3)]
        after = []
        for _ in range(3):
            tokens_per_second(second, [0] * 16)
            after += [tokens_per_second(first, [0] * 16) for _ in range(3)]
        print(f"{layout}: the first model alone {min(alone):.0f}-{max(alone):.0f} tokens/s, after the second's "
              f"turns {min(after):.0f}-{max(after):.0f} ({sum(after) / len(after) / (sum(alone) / len(alone)):.2f}x)",
              flush=True)
        first.close()
        second.close()


if __name__ == "__main__":
    main(sys.argv[1])
