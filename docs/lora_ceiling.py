"""Does the LoRA adapter's verdict follow what its base model says about the same reviews?

    python -m docs.lora_ceiling out/sft out/lora

The LoRA task is a review's sentiment said as a verdict (evals/lora_style.py). This asks the base (SFT) model the
sentiment question (evals/sentiment.py's first prompt) about each of lora_eval.jsonl's held-out reviews, the adapter
its own question, both greedy as eval_model.py generates, and prints each one's accuracy with its 95% interval, how
often the two agree, and how often both or either is right. docs/demo_experiments.md quotes its output.
"""

import sys

import torch

import eval_model
from dataset.formats import normalise_chat
from evals import TASKS
from evals.anchors import last_user_text
from evals.base import chat_record
from evals.intervals import wilson_interval
from evals.lora_style import LABELS, review_of
from evals.sentiment import CORE_ANSWERS, PROMPTS
from trainer.runtime import resolve_dtype


def sentiment_record(review: str, verdict: str) -> dict:
    """The sentiment question about a LoRA held-out review, labelled with the sentiment its verdict stands for."""
    label = next(label for label, said in LABELS.items() if said == verdict)
    return normalise_chat(chat_record([(PROMPTS[0].format(review=review), CORE_ANSWERS[label])],
                                      task="sentiment", label=label))


def main():
    base, adapter = sys.argv[1], sys.argv[2]
    device = torch.device("cpu")
    runner = eval_model.Runner(device, resolve_dtype("auto", device), 64)
    records = eval_model.load_eval_sets("dataset/demo", 0)["lora"]
    verdicts = [record["meta"]["label"] for record in records]
    questions = [sentiment_record(review_of(last_user_text(record)), verdict)
                 for record, verdict in zip(records, verdicts)]

    model, tokenizer = eval_model.load_model(eval_model.model_spec("base", base), device)
    said = [TASKS["sentiment"].parse(answer)
            for answer in eval_model.generate_answers(model, tokenizer, TASKS["sentiment"], questions, runner)]
    base_verdicts = [LABELS.get(label) for label in said]
    model, tokenizer = eval_model.load_model(eval_model.model_spec("lora", adapter, base=base), device)
    lora_verdicts = [TASKS["lora"].parse(answer)
                     for answer in eval_model.generate_answers(model, tokenizer, TASKS["lora"], records, runner)]

    n = len(records)

    def line(name: str, hits: int) -> None:
        low, high = wilson_interval(hits, n)
        print(f"  {name:<40} {hits / n:.3f} [{low:.2f}, {high:.2f}]")

    print(f"{n} held-out LoRA reviews ({base}, {adapter})")
    line("base: the sentiment question", sum(b == v for b, v in zip(base_verdicts, verdicts)))
    line("adapter: the verdict", sum(a == v for a, v in zip(lora_verdicts, verdicts)))
    line("the two say the same", sum(a == b for a, b in zip(lora_verdicts, base_verdicts)))
    line("both right", sum(a == v and b == v for a, b, v in zip(lora_verdicts, base_verdicts, verdicts)))
    line("either right", sum(a == v or b == v for a, b, v in zip(lora_verdicts, base_verdicts, verdicts)))


if __name__ == "__main__":
    main()
