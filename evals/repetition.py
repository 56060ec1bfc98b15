"""Repetition: how much of an answer repeats itself (distinct character bigrams), whatever the task.

A small model falls into loops ("这条评论是这条评论是…", a name listed to the token limit); distinct2 averages over
every generated answer, and as a reward it penalises loops in RL rollouts. An answer's form moves distinct2 too (a
think trace repeats its tags and step wording, a one-line verdict repeats nothing), so loop_free counts the loops
alone: the share of answers with at least half their bigrams distinct.
"""

from collections.abc import Iterable

from evals.base import OutputCheck


def distinct2_ratio(text: str) -> float | None:
    """Distinct character bigrams / character bigrams of one text; None under 2 bigrams (too short to tell)."""
    bigrams = [text[i:i + 2] for i in range(len(text) - 1)]
    return len(set(bigrams)) / len(bigrams) if len(bigrams) >= 2 else None


LOOP = 0.5  # distinct bigrams / bigrams under this: the answer repeats itself more than it says anything


def is_loop(text: str) -> bool:
    """Whether an answer repeats itself more than it says anything (too short to tell: no)."""
    ratio = distinct2_ratio(text)
    return ratio is not None and ratio < LOOP


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


class Loops(OutputCheck):
    """loop_free over the answers of every generation task (1.0: no answer loops)."""

    name = "loops"
    metrics = ("loop_free",)

    def score(self, outputs: list[str]) -> dict[str, float]:
        """The share of answers that do not loop."""
        return {"loop_free": sum(map(self.reward, outputs)) / len(outputs) if outputs else 1.0}

    def reward(self, text: str, record: dict | None = None) -> float:
        """1.0 unless the answer loops."""
        return 0.0 if is_loop(text) else 1.0


TASK = Repetition()
LOOPS = Loops()
