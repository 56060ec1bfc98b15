"""What structured output does to the answers, not only their form: the demo's 400 held-out sentiment questions,
answered greedily three ways through the server's engine, each verdict scored with a 95% interval.

- free: the chat answer as the model writes it, its verdict read by the task's parser;
- choice: the answer held to one of SFT's two answer sentences (vLLM's structured_outputs.choice);
- json: the answer held to {"sentiment": "正面" | "负面"} (response_format json_schema), a form the model never saw.

    python -m docs.structured_check out/sft dataset/demo
"""

import json
import sys

from dataset.chat import render_chat
from dataset.formats import iter_records
from evals.intervals import wilson_interval
from evals.sentiment import parse_sentiment_answer
from serving.chat_format import EMPTY_THINK
from serving.engine import Engine, SamplingParams
from serving.loading import load
from serving.structured import TokenTrie, choice_grammar, json_grammar

ANSWERS = ["这条评论是负面的。", "这条评论是正面的。"]  # SFT's two answers
SCHEMA = {"type": "object", "properties": {"sentiment": {"enum": ["正面", "负面"]}}, "required": ["sentiment"]}


def verdict(mode: str, text: str) -> str | None:
    if mode != "json":
        return parse_sentiment_answer(text)
    try:
        return json.loads(text)["sentiment"]
    except (ValueError, KeyError, TypeError):
        return None


def main(model_dir: str, data_dir: str) -> None:
    loaded = load(model_dir, None, "cpu", None)  # as serve.py loads it
    tokenizer, stops = loaded.tokenizer, tuple(loaded.stop_token_ids)
    records = [r for r in iter_records(f"{data_dir}/sft_eval.jsonl", "chat") if r["meta"].get("task") == "sentiment"]
    trie = TokenTrie.from_tokenizer(tokenizer)
    modes = {"free": None, "choice": choice_grammar(ANSWERS, trie), "json": json_grammar(SCHEMA, trie)}
    engine = Engine(loaded.model).start()
    for mode, grammar in modes.items():
        sequences = []
        for record in records:
            text = render_chat(record["messages"][:1], add_generation_prompt=True) + ("" if grammar is None
                                                                                          else EMPTY_THINK)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            sequences.append(engine.submit(prompt, SamplingParams(max_new_tokens=32, temperature=0.0, grammar=grammar,
                                                                  stop_token_ids=stops)))
        answers = [tokenizer.decode(list(seq), skip_special_tokens=True) for seq in sequences]
        right = sum(verdict(mode, a) == r["meta"]["label"] for a, r in zip(answers, records))
        read = sum(verdict(mode, a) is not None for a in answers)
        low, high = wilson_interval(right, len(records))
        print(f"{mode:6} verdict right {right / len(records):.3f} [{low:.3f}, {high:.3f}], read from {read} of "
              f"{len(records)} answers; e.g. {answers[0]!r}", flush=True)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
