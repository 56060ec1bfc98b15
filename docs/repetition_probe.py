"""Where a model's distinct2 comes from: its answers' distinct bigrams task by task, and how many of them loop.

    python -m docs.repetition_probe out/dpo out/distill

eval_model.py's distinct2 is one mean over the answers of every generation task, so a stage that changes the form of
some answers moves it as a loop would: a think trace repeats its tags and its wording (`<think>`, `</think>`, the same
step sentences), a one-line verdict repeats nothing. This generates as eval_model.py does (greedy, each task's token
budget, 300 items a task) on the held-out sets of dataset/demo and prints, per task, the mean distinct2 and the
answers that loop: under 0.5 distinct bigrams, e.g. `地名：美国、美国、美国…` to the token limit (a share with its 95%
Wilson interval). The last line, every answer's mean, is eval_model.py's distinct2.
docs/demo_experiments.md quotes its output.
"""

import sys

import torch

import eval_model
from evals import GENERATION_TASKS
from evals.intervals import wilson_interval
from evals.repetition import distinct2, is_loop


def main():
    runner = eval_model.Runner(torch.device("cpu"), torch.bfloat16, 32)
    sets = eval_model.load_eval_sets("dataset/demo", 300)  # eval_model.py's --limit
    for path in sys.argv[1:]:
        model, tokenizer = eval_model.load_model(eval_model.model_spec(path, path), torch.device("cpu"))
        every = []
        for task in GENERATION_TASKS:
            if not sets.get(task.name):
                continue
            answers = eval_model.generate_answers(model, tokenizer, task, sets[task.name], runner)
            every += answers
            loops = sum(map(is_loop, answers))
            low, high = wilson_interval(loops, len(answers))
            print(f"{path} {task.name:<14} distinct2 {distinct2(answers):.3f}   loops {loops}/{len(answers)} "
                  f"= {loops / len(answers):.3f} [{low:.2f}, {high:.2f}]", flush=True)
        print(f"{path} {'every answer':<14} distinct2 {distinct2(every):.3f}")


if __name__ == "__main__":
    main()
