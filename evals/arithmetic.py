"""Arithmetic word problems of 2-3 steps, answered with a think trace: the reasoning stage's checkable task.

Templates with seeded numbers (a held-out problem never repeats a training problem's template and numbers); the
trace shows every step, the answer sentence ends with the result. arith_em is the share of held-out problems
(reason_eval.jsonl, task "arith") whose answer holds the right number: the <answer> block of a trace, the whole
text of a plain answer. SFT's problems are answered plainly (the answer sentence alone): a chat model that does not
reason still answers a word problem with a number, as the distilled one answers it with a trace.
"""

import random
import re

import numpy as np

from evals.base import GenerationTask, Statistic, chat_record, prompt_messages, reference_answer
from evals.think_format import answer_block, trace

NAMES = ["小明", "小红", "小刚", "小丽", "小华", "小芳", "小军", "小兰", "小强", "小雨", "小林", "小杰"]
OBJECTS = [("个", "苹果"), ("支", "铅笔"), ("本", "书"), ("颗", "糖"), ("张", "邮票"), ("个", "橘子"), ("朵", "花"),
           ("块", "饼干"), ("辆", "玩具车"), ("个", "气球"), ("张", "贴纸"), ("颗", "弹珠")]
ROOMS = ["教室", "会议室", "礼堂", "车厢"]


def problem(rng: random.Random) -> tuple[tuple, str, str, str, int]:
    """A 2-3 step word problem: (key of template and numbers, question, think, answer, result)."""
    name, other, third = rng.sample(NAMES, 3)
    unit, thing = rng.choice(OBJECTS)
    template = rng.randrange(9)
    if template == 0:
        x = rng.randint(10, 40)
        y, z = rng.randint(1, x - 1), rng.randint(1, 20)
        a, result = x - y, x - y + z
        numbers = (x, y, z)
        question = f"{name}有{x}{unit}{thing}，送给同学{y}{unit}，又买了{z}{unit}，现在有几{unit}？"
        think = f"先算送出后剩下的：{x}-{y}={a}。再加上买的：{a}+{z}={result}。"
        answer = f"现在有{result}{unit}{thing}。"
    elif template == 1:
        x, y = rng.randint(2, 9), rng.randint(2, 12)
        z = rng.randint(1, x * y - 1)
        a, result = x * y, x * y - z
        numbers = (x, y, z)
        question = f"{name}买了{x}袋{thing}，每袋{y}{unit}，分给朋友{z}{unit}，还剩几{unit}？"
        think = f"先算一共有多少：{x}×{y}={a}。再减去分出去的：{a}-{z}={result}。"
        answer = f"还剩{result}{unit}{thing}。"
    elif template == 2:
        x, y = rng.randint(5, 30), rng.randint(1, 15)
        z = rng.randint(1, x + y - 1)
        a, result = x + y, x + y - z
        numbers = (x, y, z)
        question = (f"{name}有{x}{unit}{thing}，{other}比{name}多{y}{unit}，"
                    f"{third}比{other}少{z}{unit}，{third}有几{unit}{thing}？")
        think = f"{other}有：{x}+{y}={a}。{third}比{other}少{z}{unit}：{a}-{z}={result}。"
        answer = f"{third}有{result}{unit}{thing}。"
    elif template == 3:
        x, y = rng.randint(2, 20), rng.randint(2, 9)
        a, result = x * y, x + x * y
        numbers = (x, y)
        question = f"{name}有{x}{unit}{thing}，{other}的{thing}是{name}的{y}倍，两人一共有几{unit}{thing}？"
        think = f"{other}有：{x}×{y}={a}。两人一共：{x}+{a}={result}。"
        answer = f"两人一共有{result}{unit}{thing}。"
    elif template == 4:
        x = rng.randint(5, 30)
        y, z, w = rng.randint(1, x - 1), rng.randint(2, 6), rng.randint(2, 10)
        a, b, result = x - y, z * w, x - y + z * w
        numbers = (x, y, z, w)
        question = f"{name}有{x}{unit}{thing}，先送给同学{y}{unit}，后来又买了{z}袋，每袋{w}{unit}，现在有几{unit}？"
        think = f"先算送出后剩下的：{x}-{y}={a}。再算买来的：{z}×{w}={b}。合起来：{a}+{b}={result}。"
        answer = f"现在有{result}{unit}{thing}。"
    elif template == 5:
        room = rng.choice(ROOMS)
        x, y = rng.randint(2, 8), rng.randint(3, 9)
        z, w = rng.randint(1, x * y - 1), rng.randint(1, 10)
        a, b, result = x * y, x * y - z, x * y - z + w
        numbers = (x, y, z, w)
        question = f"{room}里有{x}排座位，每排坐{y}人，后来走了{z}人，又进来{w}人，现在{room}里有几人？"
        think = f"原来有：{x}×{y}={a}人。走了{z}人后：{a}-{z}={b}人。又进来{w}人：{b}+{w}={result}人。"
        answer = f"现在{room}里有{result}人。"
    elif template == 6:
        x, y, z = rng.randint(5, 30), rng.randint(2, 9), rng.randint(1, 50)
        a, result = x * y, x * y + z
        numbers = (x, y, z)
        question = f"{name}每天读{x}页书，读了{y}天，还剩{z}页没读，这本书一共有多少页？"
        think = f"已经读了：{x}×{y}={a}页。再加上没读的：{a}+{z}={result}页。"
        answer = f"这本书一共有{result}页。"
    elif template == 7:
        y, z = rng.randint(2, 9), rng.randint(2, 9)
        x = rng.randint(y * z, y * z + 50)
        a, result = y * z, x - y * z
        numbers = (x, y, z)
        question = f"{name}带了{x}元钱，买了{y}{unit}{thing}，每{unit}{z}元，还剩多少元？"
        think = f"先算花了多少钱：{y}×{z}={a}元。再算剩下的：{x}-{a}={result}元。"
        answer = f"还剩{result}元。"
    else:
        x, y, z, w = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
        a, b, result = x * y, z * w, x * y + z * w
        numbers = (x, y, z, w)
        question = f"{name}买了{x}袋{thing}，每袋{y}{unit}；{other}买了{z}袋，每袋{w}{unit}。两人一共买了几{unit}？"
        think = f"{name}买了：{x}×{y}={a}{unit}。{other}买了：{z}×{w}={b}{unit}。一共：{a}+{b}={result}{unit}。"
        answer = f"两人一共买了{result}{unit}{thing}。"
    # "答：" opens the answer as a school word problem's does: without it the answer's first sentence read like the
    # thinking's, and distilled models went on thinking inside <answer> (docs/demo_experiments.md).
    return (template, numbers), question, think, "答：" + answer, result


def records(rng: random.Random, n: int, taken: set[tuple], reason: bool = True, **fields) -> list[dict]:
    """n problems as trace chats (reason=False: answered with the answer sentence alone), whose (template, numbers)
    are in neither `taken` nor each other; adds their keys to `taken`. With fields (a held-out file), each record
    also keeps its result as "answer"."""
    found = []
    while len(found) < n:
        key, question, think, answer, result = problem(rng)
        if key in taken:
            continue
        taken.add(key)
        record = chat_record([(question, trace(think, answer) if reason else answer)], **fields)
        if fields:
            record["answer"] = result
        found.append(record)
    return found


def parse_arith_answer(text: str) -> int | None:
    """The last integer of the <answer> block, or of the whole text of a plain answer (neither <think> nor
    <answer>); None without one, and for a trace that never reached its <answer>."""
    block = answer_block(text)
    if block is None and "<think>" not in text:
        block = text
    numbers = re.findall(r"(?<!\d)-?\d+", block or "")
    return int(numbers[-1]) if numbers else None


# An equation of a trace, "7×12=" or "84 - 23 =": its operator is a step of the plan.
_EQUATION = re.compile(r"(?<!\d)\d+\s*([+\-×])\s*\d+\s*=")


def plan(text: str) -> list[str]:
    """The operators of the equations a trace writes before </think>, in order (["×", "-"]), numbers right or not."""
    return _EQUATION.findall(text.split("</think>")[0])


# A whole equation of a trace, "17+6=23": its operands, operator and result.
_WHOLE_EQUATION = re.compile(r"(?<!\d)(\d+)\s*([+\-×])\s*(\d+)\s*=\s*(\d+)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def step_counts(question: str, text: str) -> dict[str, int]:
    """What a trace's equations (before </think>) get right, counted apart. Copying: an operand that is not an earlier
    equation's result should be one of the question's numbers (17 and 6 of 小华有17颗糖，小强比小华多6颗…); a model
    that does not copy writes numbers from nowhere. Computing: c should be a op b, whatever a and b are (4×5=12 is
    wrong, 4×5=20 right even where 4 and 5 are not the question's); single-digit sums and products counted alone."""
    numbers = {int(n) for n in re.findall(r"\d+", question)}
    counts = dict(equations=0, right=0, digit_facts=0, digit_facts_right=0, operands=0, copied=0)
    results = set()
    for a, op, b, c in _WHOLE_EQUATION.findall(text.split("</think>")[0]):
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


def question(record: dict) -> str:
    """The word problem a record asks (its last user turn)."""
    return prompt_messages(record)[-1]["content"]


class Arithmetic(GenerationTask):
    """arith_em: the share of answers (a trace's <answer>, or a plain answer) that end with the record's result.
    arith_plan: the share whose trace takes the reference's steps (its operators, in order) whatever numbers it
    writes: what a model too small to copy and compute numbers in the demo's budget still learns from the traces
    (docs/demo_experiments.md). A plain answer takes no steps.
    The two things a right answer needs besides the steps, over all the traces' equations (step_counts):
    arith_copy, the share of their operands (an earlier step's result aside) that are numbers of the question;
    arith_calc, the share of the equations whose result is right for the numbers they write. An answer that writes
    no equation adds nothing to either; a model whose answers write none scores 0 on both."""

    name = "arith"
    eval_file = "reason_eval.jsonl"
    record_kind = "chat"
    record_task = "arith"
    max_new_tokens = 96
    metrics = ("arith_em", "arith_plan", "arith_copy", "arith_calc")

    def parse(self, text: str) -> int | None:
        return parse_arith_answer(text)

    def reward(self, text: str, record: dict) -> float:
        """1.0 when the answer (parse_arith_answer) ends with the record's result, else 0.0."""
        return float(parse_arith_answer(text) == record["meta"]["answer"])

    def item_metrics(self, text: str, record: dict) -> dict[str, float]:
        return self.statistic([text], [record])([0])

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        return self.statistic(outputs, records)(list(range(len(outputs))))

    def statistic(self, outputs: list[str], records: list[dict]) -> Statistic:
        """arith_em and arith_plan are means over the answers drawn; arith_copy and arith_calc pool the equations of
        those answers (a trace of three equations weighs three times one of one)."""
        columns = ("arith_em", "arith_plan", "copied", "operands", "right", "equations")

        def row(text: str, record: dict) -> list[float]:
            counts = step_counts(question(record), text)
            right_steps = plan(text) == plan(reference_answer(record))
            return [self.reward(text, record), float(right_steps), *(counts[key] for key in columns[2:])]

        items = np.array([row(text, record) for text, record in zip(outputs, records)],
                         dtype=np.float64).reshape(-1, len(columns))

        def metrics(idx: list[int]) -> dict[str, float]:
            if not idx:
                return dict.fromkeys(self.metrics, 0.0)
            total = dict(zip(columns, items[idx].sum(axis=0).tolist()))
            return {"arith_em": total["arith_em"] / len(idx), "arith_plan": total["arith_plan"] / len(idx),
                    "arith_copy": ratio(total["copied"], total["operands"]),
                    "arith_calc": ratio(total["right"], total["equations"])}

        return metrics


def ratio(part: int, whole: int) -> float:
    """part / whole, 0 where there is no whole (no equation written)."""
    return part / whole if whole else 0.0


TASK = Arithmetic()
