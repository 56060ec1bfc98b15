"""Repetition: how much of an answer repeats itself (distinct character bigrams), whatever the task.

A small model falls into loops ("这条评论是这条评论是…"); distinct2 averages over every generated answer, and as a
reward it penalises loops in RL rollouts.
"""

from collections.abc import Iterable

from evals.base import OutputCheck


def distinct2_ratio(text: str) -> float | None:
    """Distinct character bigrams / character bigrams of one text; None under 2 bigrams (too short to tell)."""
    bigrams = [text[i:i + 2] for i in range(len(text) - 1)]
    return len(set(bigrams)) / len(bigrams) if len(bigrams) >= 2 else None


def distinct2(texts: Iterable[str]) -> float:
    """Mean over texts (with at least 2 character bigrams) of distinct bigrams / bigrams; 1.0 when none qualify."""
    ratios = [ratio for ratio in map(distinct2_ratio, texts) if ratio is not None]
    return sum(ratios) / len(ratios) if ratios else 1.0


class Repetition(OutputCheck):
    """distinct2 over the answers of every generation task (1.0: nothing repeats)."""

    name = "repetition"
    metrics = ("distinct2",)

    def score(self, outputs: list[str]) -> dict[str, float]:
        """distinct2 of all the answers."""
        return {"distinct2": distinct2(outputs)}

    def reward(self, text: str, record: dict | None = None) -> float:
        """The answer's distinct-bigram ratio (1.0 when too short to repeat)."""
        ratio = distinct2_ratio(text)
        return 1.0 if ratio is None else ratio


TASK = Repetition()
