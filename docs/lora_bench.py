"""What serving LoRA adapters unmerged costs the engine (serve.py --lora_modules): 16 requests at once, 48 greedy
tokens each, on one engine whose model has the adapter stacked: every row the base (the model's own code path: each
stacked layer checks one flag and skips its adapters), every row the adapter, and half and half. Four rounds, side
by side in one process and one engine.

    python -m docs.lora_bench out/sft out/lora
"""

import sys
import time

import torch

from model import LM
from model.lora import stack_adapters
from serving.engine import Engine, SamplingParams


def tokens_per_second(engine: Engine, adapters: list[int]) -> float:
    """Submit one request per entry of `adapters` (that adapter's), all at once, and time the whole batch."""
    params = SamplingParams(max_new_tokens=48, temperature=0, stop_token_ids=())
    start = time.perf_counter()
    sequences = [engine.submit([1, 100 + i, 200 + i, 300], params, adapter=a) for i, a in enumerate(adapters)]
    tokens = sum(len(list(seq)) for seq in sequences)
    return tokens / (time.perf_counter() - start)


def main(model_dir: str, adapter_dir: str) -> None:
    torch.set_num_threads(2)
    model = LM.from_pretrained(model_dir).eval()
    engine = Engine(model, adapters=stack_adapters(model, {"adapter": adapter_dir})).start()
    for _ in range(4):
        base = tokens_per_second(engine, [0] * 16)
        line = f"every row the base {base:.0f} tokens/s"
        for name, rows in (("every row the adapter", [1] * 16), ("half and half", [0, 1] * 8)):
            rate = tokens_per_second(engine, rows)
            line += f" | {name} {rate:.0f} ({rate / base:.2f}x)"
        print(line, flush=True)
    engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
