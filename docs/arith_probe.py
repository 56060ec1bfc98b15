"""Copying or computing: where a model's arithmetic traces go wrong, on the held-out word problems.

    python -m docs.arith_probe out/distill out/grpo

Generates as eval_model.py does (greedy, the task's token budget) on reason_eval.jsonl's word problems and reads
every equation `a op b = c` its trace writes before </think> (evals/arithmetic.py's step_counts). Two things must
hold for a right answer, and the probe counts them apart:

- copying: an operand that is not an earlier equation's result should be one of the question's numbers (17 and 6
  of 小华有17颗糖，小强比小华多6颗…); a model that does not copy writes numbers from nowhere;
- computing: c should be a op b, whatever a and b are (4×5=12 is wrong; 4×5=20 is right even if 4 and 5 were not
  the question's); single-digit sums and products are counted on their own.

Shares with 95% Wilson intervals (over the equations, as if they were independent); arith_em (the answer's number
right) alongside, as eval_model.py counts it. eval_model.py reports the first two as arith_copy and arith_calc, with
a bootstrap over problems. docs/demo_experiments.md quotes this probe's output.
"""

import collections
import sys

import torch

import eval_model
from evals import TASKS
from evals.arithmetic import question, step_counts
from evals.intervals import wilson_interval


def share(successes: int, n: int) -> str:
    if n == 0:
        return "- (none)"
    low, high = wilson_interval(successes, n)
    return f"{successes / n:.3f} [{low:.2f}, {high:.2f}] ({successes}/{n})"


def main():
    task = TASKS["arith"]
    records = eval_model.load_eval_sets("dataset/demo", 0)[task.name]
    runner = eval_model.Runner(torch.device("cpu"), torch.bfloat16, 32)
    for path in sys.argv[1:]:
        model, tokenizer = eval_model.load_model(eval_model.model_spec(path, path), torch.device("cpu"))
        answers = eval_model.generate_answers(model, tokenizer, task, records, runner)
        totals = collections.Counter()
        for record, answer in zip(records, answers):
            totals.update(step_counts(question(record), answer))
        exact = sum(task.reward(answer, record) for record, answer in zip(records, answers))
        print(f"{path}: {len(records)} problems, {totals['equations']} equations")
        print(f"  copying: operands that are the question's numbers {share(totals['copied'], totals['operands'])}")
        print(f"  computing: equations right {share(totals['right'], totals['equations'])}; "
              f"single-digit + and × {share(totals['digit_facts_right'], totals['digit_facts'])}")
        print(f"  arith_em {share(int(exact), len(records))}")


if __name__ == "__main__":
    main()
