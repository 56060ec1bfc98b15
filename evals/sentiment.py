"""Review sentiment: is a product review 正面 (positive) or 负面 (negative)?

SFT teaches it (several phrasings of question and answer, follow-ups in multi-turn chats), DPO prefers the right
label (evals.preference), and sentiment_acc is the share of held-out reviews (sft_eval.jsonl, task "sentiment")
whose answer parses to the right label.
"""

import random
import re

from evals.anchors import classify, template_field
from evals.base import GenerationTask, Turn, chat_record

LABELS = ("正面", "负面")
PROMPTS = [
    "下面这条评论是正面的还是负面的？\n{review}",
    "判断这条评论的情感倾向（正面/负面）：{review}",
    "{review}\n这条评论是好评还是差评？",
    "请分析以下用户评论的情感是正面还是负面：\n「{review}」",
    "这是一条商品评论：{review}\n它表达的是正面还是负面的态度？",
    "评论：{review}\n请判断情感：正面还是负面？",
    "帮我看看这条评价是在夸还是在批评：{review}",
    "读一读这条买家评论，告诉我它是正面的还是负面的。\n{review}",
]
FOLLOWUPS = ["那这条评论呢？{review}", "再判断一条：{review}", "这一条是正面还是负面？\n{review}"]
CORE_ANSWERS = {"正面": "这条评论是正面的。", "负面": "这条评论是负面的。"}  # the held-out reference answers
ANSWERS = {
    "正面": [CORE_ANSWERS["正面"], "这条评论是正面的，评论者总体上是满意的。", "这条评论是正面的，属于好评。"],
    "负面": [CORE_ANSWERS["负面"], "这条评论是负面的，评论者总体上不满意。", "这条评论是负面的，属于差评。"],
}


def other_label(label: str) -> str:
    """The opposite label."""
    return "负面" if label == "正面" else "正面"


def turn(rng: random.Random, review: str, label: str, prompts: list[str] = PROMPTS) -> Turn:
    """A training turn: one of the prompts around the review, one of the label's answers."""
    return rng.choice(prompts).format(review=review), rng.choice(ANSWERS[label])


def eval_record(rng: random.Random, review: str, label: str) -> dict:
    """A held-out record: the reference answer is the core sentence, the label is kept for scoring."""
    user = rng.choice(PROMPTS).format(review=review)
    return chat_record([(user, CORE_ANSWERS[label])], task="sentiment", label=label)


def parse_sentiment_answer(text: str) -> str | None:
    """"正面" or "负面" from an answer: the core `是正面/是负面` first, else the one label word present, else None."""
    core = re.search(r"是(正面|负面)", text)
    if core:
        return core.group(1)
    labels = {"正面" if word in ("正面", "好评") else "负面" for word in re.findall(r"正面|负面|好评|差评", text)}
    return labels.pop() if len(labels) == 1 else None


def review_of(question: str) -> str | None:
    """The review a sentiment question (one of PROMPTS or FOLLOWUPS) asks about; None for any other text."""
    return template_field(PROMPTS + FOLLOWUPS, question, "review")


class Sentiment(GenerationTask):
    """sentiment_acc: the share of answers that parse to the record's label."""

    name = "sentiment"
    eval_file = "sft_eval.jsonl"
    record_kind = "chat"
    record_task = "sentiment"
    max_new_tokens = 16
    metrics = ("sentiment_acc",)
    anchor_file = "sft.jsonl"

    def parse(self, text: str) -> str | None:
        return parse_sentiment_answer(text)

    def reward(self, text: str, record: dict) -> float:
        """1.0 when the answer states the record's label, else 0.0."""
        return float(parse_sentiment_answer(text) == record["meta"]["label"])

    def anchor_answers(self, train_records: list[dict], records: list[dict]) -> list[str] | None:
        """The label of a TF-IDF character 1-3-gram logistic regression (evals/anchors.py), fitted on the reviews
        of the training chats' sentiment turns, as the reference answer sentence."""
        labels = classify(train_records, records, review_of, parse_sentiment_answer)
        return None if labels is None else [CORE_ANSWERS[label] for label in labels]


TASK = Sentiment()
