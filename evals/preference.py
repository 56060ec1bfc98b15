"""Preference pairs: the same question with a chosen (right) and a rejected (plausible but wrong) answer.

DPO trains on them; pref_acc is the share of held-out pairs (dpo_eval.jsonl) where the model itself prefers the
chosen answer: its mean per-token log-probability of the chosen answer is higher than that of the rejected one (no
reference model). Pairs are built from the sentiment and entity tasks, and say which in their "task" field.
"""

import random

from dataset.chat import tokenize_chat
from evals import entities, sentiment
from evals.base import LikelihoodTask, ScoredTokens, share
from evals.entities import Sentence, entity_f1, format_entity_answer, parse_entity_answer, wrong_entities
from evals.sentiment import parse_sentiment_answer


def pair(user: str, chosen: str, rejected: str, **fields) -> dict:
    """A preference record: one user turn, answered two ways."""
    return {"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}], **fields}


def degenerate(answer: str, rng: random.Random) -> str:
    """The answer's first few characters over and over: the repetition loop a weak model falls into."""
    return answer[:rng.randint(3, 4)] * rng.randint(6, 12) + "…"


def sentiment_pair(rng: random.Random, review: str, label: str, **fields) -> dict:
    """Chosen: the right label. Rejected: the other label in the same words, or a repetition loop."""
    variant = rng.randrange(len(sentiment.ANSWERS[label]))
    chosen = sentiment.ANSWERS[label][variant]
    other = sentiment.other_label(label)
    rejected = sentiment.ANSWERS[other][variant] if rng.random() < 0.8 else degenerate(chosen, rng)
    return pair(rng.choice(sentiment.PROMPTS).format(review=review), chosen, rejected, **fields)


def entity_pair(rng: random.Random, sentence: Sentence, names: dict[str, list[str]], **fields) -> dict:
    """Chosen: the sentence's entities. Rejected: one entity missed, mistyped or invented (from `names`), or a
    repetition loop."""
    chosen = format_entity_answer(sentence.entities)
    wrong = None if rng.random() < 0.1 else wrong_entities(rng, sentence, names)
    rejected = degenerate(chosen, rng) if wrong is None else format_entity_answer(wrong)
    return pair(rng.choice(entities.PROMPTS).format(sentence=sentence.text), chosen, rejected, **fields)


class Preference(LikelihoodTask):
    """pref_acc: the share of pairs whose chosen answer the model gives the higher mean token log-prob."""

    name = "pref"
    eval_file = "dpo_eval.jsonl"
    record_kind = "dpo"
    metrics = ("pref_acc",)

    def sequences(self, tokenizer, records: list[dict]) -> list[ScoredTokens]:
        """Each pair's chosen then rejected conversation, its assistant tokens scored."""
        return [tokenize_chat(tokenizer, record["prompt"] + record[side]) for record in records
                for side in ("chosen", "rejected")]

    def score(self, logps: list[tuple[float, int]], records: list[dict]) -> dict[str, float]:
        """pref_acc from the (summed log-prob, tokens) of sequences()' sequences."""
        means = [total / max(count, 1) for total, count in logps]
        return {"pref_acc": share(chosen > rejected for chosen, rejected in zip(means[0::2], means[1::2]))}

    def reward(self, text: str, record: dict) -> float:
        """How well an answer to the pair's question states what its chosen answer states, judged as the pair's
        task judges: the same sentiment label (1.0 or 0.0), or entity F1 against the chosen entities."""
        chosen = record["chosen"][-1]["content"]
        task = record["meta"].get("task")
        if task == "sentiment":
            label = parse_sentiment_answer(chosen)
            return float(label is not None and parse_sentiment_answer(text) == label)
        if task == "entity":
            return entity_f1([parse_entity_answer(text)], [parse_entity_answer(chosen)])["entity_f1"]
        raise ValueError(f"a preference pair of task {task!r}: only sentiment and entity pairs can judge an answer")


TASK = Preference()
