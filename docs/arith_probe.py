"""Copying or computing: where a model's arithmetic traces go wrong, on the held-out word problems.

    python -m docs.arith_probe out/distill out/grpo

Generates as eval_model.py does (greedy, the task's token budget) on reason_eval.jsonl's word problems and reads
every equation `a op b = c` its trace writes before </think>. Two things must hold for a right answer, and the probe
counts them apart:

- copying: an operand that is not an earlier equation's result should be one of the question's numbers (17 and 6
  of 小华有17颗糖，小强比小华多6颗…); a model that does not copy writes numbers from nowhere;
- computing: c should be a op b, whatever a and b are (4×5=12 is wrong; 4×5=20 is right even if 4 and 5 were not
  the question's); single-digit sums and products are counted on their own.

Shares with 95% Wilson intervals; arith_em (the answer's number right) alongside, as eval_model.py counts it.
docs/demo_experiments.md quotes its output.
"""

import collections
import re
import sys

import torch

import eval_model
from evals import TASKS
from evals.intervals import wilson_interval

EQUATION = re.compile(r"(?<!\d)(\d+)\s*([+\-×])\s*(\d+)\s*=\s*(\d+)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def share(successes: int, n: int) -> str:
    if n == 0:
        return "- (none)"
    low, high = wilson_interval(successes, n)
    return f"{successes / n:.3f} [{low:.2f}, {high:.2f}] ({successes}/{n})"


def count(question: str, answer: str) -> dict[str, int]:
    """Counts for one trace: equations and how many are right, operands and how many are the question's numbers."""
    numbers = {int(n) for n in re.findall(r"\d+", question)}
    counts = dict(equations=0, right=0, digit_facts=0, digit_facts_right=0, operands=0, copied=0)
    results = set()
    for a, op, b, c in EQUATION.findall(answer.split("</think>")[0]):
        a, b, c = int(a), int(b), int(c)
        right = OPERATIONS[op](a, b) == c
        counts["equations"] += 1
        counts["right"] += right
        if a < 10 and b < 10 and op in "+×":
            counts["digit_facts"] += 1
            counts["digit_facts_right"] += right
        for operand in (a, b):
            if operand not in results:  # an earlier step's result (right or not) is the trace's own number
                counts["operands"] += 1
                counts["copied"] += operand in numbers
        results.add(c)
    return counts


def main():
    task = TASKS["arith"]
    records = eval_model.load_eval_sets("dataset/demo", 0)[task.name]
    runner = eval_model.Runner(torch.device("cpu"), torch.bfloat16, 32)
    for path in sys.argv[1:]:
        model, tokenizer = eval_model.load_model(eval_model.model_spec(path, path), torch.device("cpu"))
        answers = eval_model.generate_answers(model, tokenizer, task, records, runner)
        totals = collections.Counter()
        for record, answer in zip(records, answers):
            totals.update(count(record["messages"][0]["content"], answer))
        exact = sum(task.reward(answer, record) for record, answer in zip(records, answers))
        print(f"{path}: {len(records)} problems, {totals['equations']} equations")
        print(f"  copying: operands that are the question's numbers {share(totals['copied'], totals['operands'])}")
        print(f"  computing: equations right {share(totals['right'], totals['equations'])}; "
              f"single-digit + and × {share(totals['digit_facts_right'], totals['digit_facts'])}")
        print(f"  arith_em {share(int(exact), len(records))}")


if __name__ == "__main__":
    main()
