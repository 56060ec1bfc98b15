"""The LoRA task: a review's verdict in one word, 推荐 (recommend) or 不推荐 (do not recommend).

A narrow new answer style that a LoRA adapter learns on top of the SFT model: SFT answers sentiment questions in a
sentence (这条评论是正面的，属于好评。); this task asks for the buying verdict alone, in words SFT never answered with.
lora_acc is the share of held-out reviews (lora_eval.jsonl) answered with the right verdict.

The task used to be the sentiment as one English word (positive / negative). The demo's tokenizer, trained on Chinese
text only, splits each of those into eight single-letter tokens that pretraining hardly saw, and the demo's 80 LoRA
steps learned to spell one label, not to choose between them (lora_acc 0.500 on a balanced set; docs/
demo_experiments.md). Both verdicts here are tokens the model already knows, so the steps go to the choice.
"""

import random

from evals.anchors import classify, template_field
from evals.base import GenerationTask, chat_record

PROMPTS = ["看了这条评论，你会推荐它评价的东西吗？只回答：推荐 或 不推荐。\n{review}",
           "{review}\n根据这条评论，推荐还是不推荐？"]
NEGATIVE, POSITIVE = "不推荐", "推荐"
LABELS = {"正面": POSITIVE, "负面": NEGATIVE}  # the review's label -> the answer


def record(rng: random.Random, review: str, label: str, heldout: bool = False) -> dict:
    """A chat whose answer is the verdict; a held-out one keeps its task and label for scoring."""
    user = rng.choice(PROMPTS).format(review=review)
    fields = {"task": "lora_sentiment", "label": LABELS[label]} if heldout else {}
    return chat_record([(user, LABELS[label])], **fields)


def review_of(question: str) -> str | None:
    """The review a LoRA-task question (one of PROMPTS) asks about; None for any other text."""
    return template_field(PROMPTS, question, "review")


def parse_verdict(text: str) -> str | None:
    """"推荐" or "不推荐" from a LoRA-task answer: the one verdict it names; None when it names neither or both."""
    negative = text.count(NEGATIVE)
    positive = text.count(POSITIVE) - negative  # every 不推荐 also contains 推荐
    if bool(positive) == bool(negative):
        return None
    return POSITIVE if positive else NEGATIVE


class LoraSentiment(GenerationTask):
    """lora_acc: the share of answers that name the record's verdict."""

    name = "lora"
    eval_file = "lora_eval.jsonl"
    record_kind = "chat"
    max_new_tokens = 8
    metrics = ("lora_acc",)
    anchor_file = "lora.jsonl"

    def parse(self, text: str) -> str | None:
        return parse_verdict(text)

    def reward(self, text: str, record: dict) -> float:
        """1.0 when the answer names the record's verdict (and not the other), else 0.0."""
        return float(parse_verdict(text) == record["meta"]["label"])

    def anchor_answers(self, train_records: list[dict], records: list[dict]) -> list[str] | None:
        """The verdict of a TF-IDF character 1-3-gram logistic regression (evals/anchors.py), fitted on the reviews
        and verdicts of the training chats (the adapter's own training set)."""
        return classify(train_records, records, review_of, parse_verdict)


TASK = LoraSentiment()
