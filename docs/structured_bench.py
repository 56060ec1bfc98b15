"""What structured output costs the engine: 16 requests at once, 48 sampled tokens each (0.7 / top_p 0.9), plain,
then held to json_object, to a small schema, to text whose tool calls fit (tool_choice "auto") and to a GBNF
grammar of nested lists, each grammar run twice (first with its token masks still to find, then cached). Three
rounds, side by side in one process.

    python -m docs.structured_bench out/sft
"""

import sys
import threading
import time

import torch

from dataset.chat import load_tokenizer
from model import LM
from serving.engine import Engine, SamplingParams, complete
from serving.structured import TokenTrie, cfg_grammar, json_grammar, tool_text_grammar

NESTED = 'root ::= list\nlist ::= "[" (item ("，" item)*)? "]"\nitem ::= list | [\\u4e00-\\u9fa5]{1,4} | [0-9]+'
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["正面", "负面"]}, "why": {"type": "string"},
                                           "stars": {"type": "integer"}}, "required": ["label", "why", "stars"]}


def tokens_per_second(engine: Engine, grammar) -> float:
    done = []

    def go(i):
        params = SamplingParams(seed=i, max_new_tokens=48, temperature=0.7, top_p=0.9, grammar=grammar)
        done.append(len(complete(engine, [1, 100 + i, 200 + i, 300], params).tokens))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def main(model_dir: str) -> None:
    torch.set_num_threads(2)
    model = LM.from_pretrained(model_dir).eval()
    trie = TokenTrie.from_tokenizer(load_tokenizer(model_dir))
    engine = Engine(model).start()
    for _ in range(3):
        plain = tokens_per_second(engine, None)
        line = f"plain {plain:.0f} tokens/s"
        for name, make in (("json_object", lambda: json_grammar({"type": "object"}, trie)),
                           ("schema", lambda: json_grammar(SCHEMA, trie)),
                           ("tools, auto", lambda: tool_text_grammar([{"name": "f", "parameters": SCHEMA}], trie,
                                                                     "<tool_call>", "</tool_call>")),
                           ("GBNF, nested", lambda: cfg_grammar(NESTED, trie))):
            grammar = make()
            first, cached = tokens_per_second(engine, grammar), tokens_per_second(engine, grammar)
            line += f" | {name} {first:.0f} first, {cached:.0f} cached ({cached / plain:.2f}x)"
        print(line, flush=True)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1])
