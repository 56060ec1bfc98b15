"""Preference pairs: the same question with a chosen and a rejected answer.

The chosen answer is right and in the style the demo's users prefer; the rejected one is wrong (the other sentiment
label, an entity invented or given the wrong type), a repetition loop, or, for half of the sentiment pairs, right but
in one of the two other styles SFT taught as often (`PREFERRED_SENTIMENT`). SFT cannot know that preference; DPO
learns it from the pairs, which makes its effect visible at the demo's budget, where it cannot add much task
knowledge to what SFT's chats taught (docs/demo_experiments.md, "A preference SFT does not teach").

DPO trains on them; pref_acc is the share of held-out pairs (dpo_eval.jsonl) where the model itself prefers the
chosen answer: its mean per-token log-probability of the chosen answer is higher than that of the rejected one (no
reference model). Pairs are built from the sentiment and entity tasks, and say which in their "task" field.
"""

import random

from dataset.chat import tokenize_chat
from evals import entities, sentiment
from evals.base import LikelihoodTask, ScoredTokens, Statistic, share
from evals.entities import Sentence, entity_f1, format_entity_answer, parse_entity_answer, wrong_entities
from evals.sentiment import parse_sentiment_answer


def pair(user: str, chosen: str, rejected: str, **fields) -> dict:
    """A preference record: one user turn, answered two ways."""
    return {"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}], **fields}


def degenerate(answer: str, rng: random.Random) -> str:
    """The answer's first few characters over and over: the repetition loop a weak model falls into."""
    return answer[:rng.randint(3, 4)] * rng.randint(6, 12) + "…"


# The preferred answer style: the label and the verdict word (好评 / 差评), the third of sentiment.ANSWERS' styles.
PREFERRED_SENTIMENT = {label: answers[2] for label, answers in sentiment.ANSWERS.items()}


def sentiment_pair(rng: random.Random, review: str, label: str, **fields) -> dict:
    """Chosen: the right label in the preferred style. Rejected: half the time the right label in another style,
    else the other label in the preferred style (three in ten) or a repetition loop (two in ten)."""
    chosen = PREFERRED_SENTIMENT[label]
    draw = rng.random()
    if draw < 0.5:
        rejected = rng.choice([answer for answer in sentiment.ANSWERS[label] if answer != chosen])
    elif draw < 0.8:
        rejected = PREFERRED_SENTIMENT[sentiment.other_label(label)]
    else:
        rejected = degenerate(chosen, rng)
    return pair(rng.choice(sentiment.PROMPTS).format(review=review), chosen, rejected, **fields)


def entity_pair(rng: random.Random, sentence: Sentence, names: dict[str, list[str]], **fields) -> dict:
    """Chosen: the sentence's entities. Rejected: one entity given the wrong type or invented (from `names`), or a
    repetition loop (entities.wrong_entities says why never a missed entity)."""
    chosen = format_entity_answer(sentence.entities)
    wrong = None if rng.random() < 0.1 else wrong_entities(rng, sentence, names)
    rejected = degenerate(chosen, rng) if wrong is None else format_entity_answer(wrong)
    return pair(rng.choice(entities.PROMPTS).format(sentence=sentence.text), chosen, rejected, **fields)


def is_style_pair(record: dict) -> bool:
    """Whether a held-out pair's rejected answer is right too, only not in the preferred style (a sentiment pair
    whose two answers state the same label)."""
    if record.get("meta", {}).get("task") != "sentiment":
        return False
    chosen, rejected = (parse_sentiment_answer(record[side][-1]["content"]) for side in ("chosen", "rejected"))
    return chosen is not None and chosen == rejected


class Preference(LikelihoodTask):
    """pref_acc: the share of pairs whose chosen answer the model gives the higher mean token log-prob;
    pref_style_acc: the same over the pairs that differ only in style (is_style_pair), the preference SFT cannot
    teach; left out when there are none."""

    name = "pref"
    eval_file = "dpo_eval.jsonl"
    record_kind = "dpo"
    metrics = ("pref_acc", "pref_style_acc")

    def sequences(self, tokenizer, records: list[dict]) -> list[ScoredTokens]:
        """Each pair's chosen then rejected conversation, its assistant tokens scored."""
        return [tokenize_chat(tokenizer, record["prompt"] + record[side]) for record in records
                for side in ("chosen", "rejected")]

    def score(self, logps: list[tuple[float, int]], records: list[dict]) -> dict[str, float]:
        """pref_acc (and pref_style_acc) from the (summed log-prob, tokens) of sequences()' sequences."""
        return self.statistic(logps, records)(list(range(len(records))))

    def statistic(self, logps: list[tuple[float, int]], records: list[dict]) -> Statistic:
        """score() on any resample of the pairs, each pair judged once."""
        means = [total / max(count, 1) for total, count in logps]
        wins = [chosen > rejected for chosen, rejected in zip(means[0::2], means[1::2])]
        style = [is_style_pair(record) for record in records]

        def statistic(idx: list[int]) -> dict[str, float]:
            metrics = {"pref_acc": share(wins[i] for i in idx)}
            if any(style[i] for i in idx):
                metrics["pref_style_acc"] = share(wins[i] for i in idx if style[i])
            return metrics

        return statistic

    def reward(self, text: str, record: dict) -> float:
        """How well an answer to the pair's question states what its chosen answer states, judged as the pair's
        task judges: the same sentiment label (1.0 or 0.0, whatever the style), or entity F1 against the chosen
        entities."""
        chosen = record["chosen"][-1]["content"]
        task = record["meta"].get("task")
        if task == "sentiment":
            label = parse_sentiment_answer(chosen)
            return float(label is not None and parse_sentiment_answer(text) == label)
        if task == "entity":
            return entity_f1([parse_entity_answer(text)], [parse_entity_answer(chosen)])["entity_f1"]
        raise ValueError(f"a preference pair of task {task!r}: only sentiment and entity pairs can judge an answer")


TASK = Preference()
