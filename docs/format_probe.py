"""Why a model's think/answer format fails: its answers to the held-out reasoning questions, sorted by what broke.

    python -m docs.format_probe out/distill [answers.jsonl]

Generates as eval_model.py does (greedy, the tasks' token budgets) on reason_eval.jsonl's word problems and entity
questions, and prints: the well-formed share, the failures by kind (no </answer>: cut off or stopped; a tag missing
or repeated), the entity failures by how many entities the held-out sentence has, and the most common failing
answers. With a second argument, every answer goes to that JSONL file. docs/demo_experiments.md quotes its output.
"""

import collections
import json
import sys

import torch

import eval_model
from evals import TASKS
from evals.think_format import is_think_format


def main():
    path = sys.argv[1]
    model, tokenizer = eval_model.load_model(eval_model.model_spec(path, path), torch.device("cpu"))
    runner = eval_model.Runner(torch.device("cpu"), torch.bfloat16, 32)
    sets = eval_model.load_eval_sets("dataset/demo", 0)
    rows = []
    for task in (TASKS["arith"], TASKS["entity_reason"]):
        answers = eval_model.generate_answers(model, tokenizer, task, sets[task.name], runner)
        for record, answer in zip(sets[task.name], answers):
            entities = record["meta"].get("entities")
            rows.append({"task": task.name, "ok": is_think_format(answer), "answer": answer,
                         "entities": None if entities is None else sum(map(len, entities.values()))})
    failed = [row for row in rows if not row["ok"]]
    why = collections.Counter("no </answer>" if "</answer>" not in row["answer"] else "a tag missing or repeated"
                              for row in failed)
    print(f"{path}: well-formed {len(rows) - len(failed)} / {len(rows)}; failures {dict(why)}")
    by_count = collections.Counter((row["ok"], min(row["entities"], 3)) for row in rows if row["entities"] is not None)
    for n in range(4):
        label = f"{n}+" if n == 3 else str(n)
        print(f"  entity questions with {label} entities: {by_count[False, n]} failed of "
              f"{by_count[False, n] + by_count[True, n]}")
    for answer, count in collections.Counter(row["answer"] for row in failed).most_common(3):
        print(f"  {count}x {answer!r}")
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


if __name__ == "__main__":
    main()
