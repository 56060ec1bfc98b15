"""95% confidence intervals of the held-out metrics: how far a score could move on another draw of items.

Two methods, chosen per metric by what it is:

- Wilson score interval for a share of items that pass (sentiment_acc, arith_em, arith_plan, lora_acc,
  think_format): the metric is the mean of 0/1 per-item scores. Unlike the normal approximation it stays inside
  [0, 1] and is not empty at 0 or 1 (0 of 300 right: [0, 0.013]).
- Percentile bootstrap over items for everything else (entity_f1 and its per-type scores, pref_acc, val_ppl over
  documents, distinct2 over answers): resample the items with replacement, recompute the metric exactly as the
  task does, take the 2.5th and 97.5th percentiles. A pair (pref_acc) or a document (val_ppl) is one item.

With n items a task, a difference between two models smaller than about the interval's half-width is noise:
at 300 items an accuracy near 0.8 has a half-width of about 0.045. Two models answer the same items, though, and
`paired_changes` measures the change between them directly: a bootstrap that gives both models the same resampled
items, so that what the two get right together (most of it, between consecutive stages) cancels out. Its interval
is narrower than two separate ones suggest when the models agree item by item, and wider when they do not.

A bootstrap cannot see past what the items hold: an entity F1 of 0 with no entity found in any item gets [0, 0]
(every resample is 0 too), which says "no evidence of any skill", not "exactly 0"; Wilson's [0, 0.013] at 0/300 is
the bound such a share can claim.
"""

import math
import random
from collections.abc import Callable, Sequence

from evals.base import GenerationTask, LikelihoodTask, OutputCheck, Statistic
from evals.entities import EntityTask
from evals.repetition import Repetition, distinct2_ratio

Interval = tuple[float, float]
Resampler = tuple[int, Statistic]  # (how many items, their statistic)
Z95 = 1.959964  # the standard normal's 97.5th percentile
DRAWS = 1000  # bootstrap resamples: the percentiles move by well under 0.01 between seeds at 1000


def wilson_interval(successes: float, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of a proportion successes / n (the whole [0, 1] for n = 0)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, interpolating linearly between neighbours (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def bootstrap_intervals(statistic: Callable[[list[int]], dict[str, float]], n: int, draws: int = DRAWS,
                        seed: int = 0) -> dict[str, Interval]:
    """Percentile intervals of each metric statistic(indices) returns, over `draws` resamples of range(n) with
    replacement. Seeded: the same items give the same intervals."""
    if n == 0:
        return {}
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(draws):
        for metric, value in statistic(rng.choices(range(n), k=n)).items():
            samples.setdefault(metric, []).append(value)
    intervals = {}
    for metric, values in samples.items():
        values.sort()
        intervals[metric] = (percentile(values, 0.025), percentile(values, 0.975))
    return intervals


def binary_share(rewards: list[float], value: float) -> bool:
    """Whether a metric `value` is the share of 0/1 `rewards` (then Wilson applies)."""
    return bool(rewards) and all(r in (0.0, 1.0) for r in rewards) and abs(sum(rewards) / len(rewards) - value) < 1e-9


def generation_intervals(task: GenerationTask, outputs: list[str], records: list[dict], metrics: dict[str, float],
                         draws: int = DRAWS) -> dict[str, Interval]:
    """Intervals of a generation task's metrics: Wilson for a share of right answers, else a bootstrap over items
    (entity F1: each answer parsed once, then entity_f1 of every resample)."""
    if not metrics or not outputs:
        return {}
    if isinstance(task, EntityTask):
        return bootstrap_intervals(task.statistic(outputs, records), len(outputs), draws)
    items = [task.item_metrics(text, record) for text, record in zip(outputs, records)]
    intervals = {}
    for metric, value in metrics.items():
        values = [item[metric] for item in items]
        if binary_share(values, value):
            intervals[metric] = wilson_interval(sum(values), len(values))
    if len(intervals) == len(metrics):
        return intervals
    resampled = bootstrap_intervals(task.statistic(outputs, records), len(outputs), draws)
    return {**resampled, **intervals}


def likelihood_intervals(task: LikelihoodTask, logps: list[tuple[float, int]], records: list[dict],
                         draws: int = DRAWS) -> dict[str, Interval]:
    """A bootstrap over records (a record's sequences, e.g. a pair's chosen and rejected, move together)."""
    if not records:
        return {}
    return bootstrap_intervals(task.statistic(logps, records), len(records), draws)


def check_intervals(check: OutputCheck, outputs: list[str], metrics: dict[str, float],
                    draws: int = DRAWS) -> dict[str, Interval]:
    """An output check's interval over answers: Wilson for a share of answers that pass, else a bootstrap
    (distinct2: the mean of per-answer ratios over the answers long enough to have one)."""
    if not metrics or not outputs:
        return {}
    (metric, value), = metrics.items()
    rewards = [check.reward(text) for text in outputs]
    if binary_share(rewards, value):
        return {metric: wilson_interval(sum(rewards), len(rewards))}
    if isinstance(check, Repetition):
        ratios = [r for r in map(distinct2_ratio, outputs) if r is not None]
        if not ratios:
            return {metric: (value, value)}
        return bootstrap_intervals(lambda idx: {metric: sum(ratios[i] for i in idx) / len(idx)}, len(ratios), draws)
    return bootstrap_intervals(lambda idx: check.score([outputs[i] for i in idx]), len(outputs), draws)


# ---------------------------------------------------------------------------------------------------------------------
# Two models on the same items


def likelihood_resampler(task: LikelihoodTask, logps: list[tuple[float, int]], records: list[dict]) -> Resampler:
    """The task's metrics over a resample of its records (the task's own statistic)."""
    return len(records), task.statistic(logps, records)


def generation_resampler(task: GenerationTask, outputs: list[str], records: list[dict]) -> Resampler:
    """The task's metrics over a resample of its answers (the task's own statistic: each answer read once)."""
    return len(outputs), task.statistic(outputs, records)


def check_resampler(check: OutputCheck, outputs: list[str]) -> Resampler:
    """An output check's metric over a resample of the answers (every answer, so that two models' answers pair up:
    distinct2 averages the ratios of the resampled answers long enough to have one)."""
    (metric,) = check.metrics
    if isinstance(check, Repetition):
        ratios = [distinct2_ratio(text) for text in outputs]

        def statistic(idx: list[int]) -> dict[str, float]:
            found = [ratios[i] for i in idx if ratios[i] is not None]
            return {metric: sum(found) / len(found) if found else 1.0}

        return len(outputs), statistic
    rewards = [check.reward(text) for text in outputs]
    if binary_share(rewards, check.score(outputs)[metric]):
        return len(outputs), lambda idx: {metric: sum(rewards[i] for i in idx) / len(idx)}
    return len(outputs), lambda idx: check.score([outputs[i] for i in idx])


def paired_changes(before: dict[str, Resampler], after: dict[str, Resampler], draws: int = DRAWS,
                   seed: int = 0) -> dict[str, tuple[float, Interval]]:
    """after - before on every metric both models have, over the same held-out items: {metric: (change on all the
    items, its 95% percentile interval)}. Each resample gives both models the same items (a paired bootstrap), so
    an interval that leaves out 0 is a change beyond what another draw of items could give. Item sets of different
    sizes (another --limit) are not paired."""
    def difference(old: Statistic, new: Statistic) -> Statistic:
        def statistic(idx: list[int]) -> dict[str, float]:
            first, second = old(idx), new(idx)
            return {metric: second[metric] - first[metric] for metric in second if metric in first}

        return statistic

    changes: dict[str, tuple[float, Interval]] = {}
    for group, (n, statistic_after) in after.items():
        if group not in before or before[group][0] != n or n == 0:
            continue
        change = difference(before[group][1], statistic_after)
        intervals = bootstrap_intervals(change, n, draws, seed)
        for metric, value in change(list(range(n))).items():
            if metric in intervals:
                changes[metric] = (value, intervals[metric])
    return changes
