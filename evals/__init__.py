"""The tasks: one module each, owning its records, prompts, token budget, answer parser, score and reward.

    sentiment.py     review sentiment (正面 / 负面): sentiment_acc
    entities.py      persons, places, organisations of a news sentence: entity_f1; and their think traces
    identity.py      who are you? the model's self-introduction: identity_acc
    arithmetic.py    2-3 step word problems with think traces: arith_em, arith_plan, arith_copy, arith_calc
    lora_style.py    the LoRA task, a review's verdict in one word (推荐 / 不推荐): lora_acc
    preference.py    chosen / rejected pairs scored by the model's log-probs: pref_acc
    perplexity.py    held-out news: val_ppl
    think_format.py  the <think>/<answer> format of traces: think_format
    repetition.py    distinct character bigrams of any answer: distinct2; the answers that loop: loop_free

dataset/demo.py writes the records, eval_model.py runs TASKS in order (their metrics are the report's rows, in
this order), and an RL reward is TASKS[name].reward(completion_text, record). Sentiment, entities and the LoRA task
also answer with an anchor, a classical method fitted on a training file (anchors.py: the table's last column).
"""

from evals import (
    arithmetic,
    entities,
    identity,
    lora_style,
    perplexity,
    preference,
    repetition,
    sentiment,
    think_format,
)
from evals.base import GenerationTask, LikelihoodTask, OutputCheck, Task

TASKS: dict[str, Task | OutputCheck] = {task.name: task for task in (
    perplexity.TASK,
    sentiment.TASK,
    entities.TASK,
    identity.TASK,
    arithmetic.TASK,
    entities.REASON_TASK,
    think_format.TASK,  # over the two reasoning tasks above
    lora_style.TASK,
    preference.TASK,
    repetition.TASK,  # over every generation task
    repetition.LOOPS,  # over every generation task
)}
GENERATION_TASKS = [task for task in TASKS.values() if isinstance(task, GenerationTask)]
LIKELIHOOD_TASKS = [task for task in TASKS.values() if isinstance(task, LikelihoodTask)]
OUTPUT_CHECKS = [task for task in TASKS.values() if isinstance(task, OutputCheck)]
METRICS = tuple(metric for task in TASKS.values() for metric in task.metrics)

__all__ = ["GENERATION_TASKS", "LIKELIHOOD_TASKS", "METRICS", "OUTPUT_CHECKS", "TASKS", "GenerationTask",
           "LikelihoodTask", "OutputCheck", "Task"]
