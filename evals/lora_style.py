"""The LoRA task: answer a review's sentiment with one English word, positive or negative.

A narrow new skill (English prompt and answer) that a LoRA adapter learns on top of the SFT model; lora_acc is the
share of held-out reviews (lora_eval.jsonl) answered with the right word.
"""

import random
import re

from evals.base import GenerationTask, chat_record

PROMPTS = ["Sentiment (positive/negative)? {review}", "Review: {review}\nSentiment (positive/negative)?"]
LABELS = {"正面": "positive", "负面": "negative"}  # the review's label -> the answer


def record(rng: random.Random, review: str, label: str, heldout: bool = False) -> dict:
    """A chat whose answer is the English label; a held-out one keeps its task and label for scoring."""
    user = rng.choice(PROMPTS).format(review=review)
    fields = {"task": "lora_sentiment", "label": LABELS[label]} if heldout else {}
    return chat_record([(user, LABELS[label])], **fields)


def parse_english_sentiment(text: str) -> str | None:
    """"positive" or "negative" from a LoRA-task answer, None when neither or both appear."""
    labels = set(re.findall(r"\b(positive|negative)\b", text.lower()))
    return labels.pop() if len(labels) == 1 else None


class LoraSentiment(GenerationTask):
    """lora_acc: the share of answers that name the record's English label."""

    name = "lora"
    eval_file = "lora_eval.jsonl"
    record_kind = "chat"
    max_new_tokens = 8
    metrics = ("lora_acc",)

    def parse(self, text: str) -> str | None:
        return parse_english_sentiment(text)

    def reward(self, text: str, record: dict) -> float:
        """1.0 when the answer names the record's label (and not the other), else 0.0."""
        return float(parse_english_sentiment(text) == record["meta"]["label"])


TASK = LoraSentiment()
