"""Mixing sources by weight: `--data_path a.jsonl:0.7,b.jsonl:0.3` for every stage.

A plain comma list (`a.jsonl,b.jsonl`) keeps its meaning: the files are read one after the other, as one source.
With weights, each file is its own source and the stage's items (SFT conversations, DPO pairs, RL prompts,
pretraining windows) are drawn from the sources in those proportions: a later stage replays an earlier stage's
data this way (`--data_path sft.jsonl:0.8,pretrain_chat.jsonl:0.2`), the usual cure for forgetting.

How many items an epoch has: as many as all the sources together, split by weight. A source asked for more items
than it has repeats (a fresh shuffled pass each time round), one asked for fewer contributes a seeded random
subset. Weights need not sum to 1; they are normalised.
"""

import math
import re
from pathlib import Path

import numpy as np

from dataset.errors import UsageError

_WEIGHT = re.compile(r"^(?P<path>.+):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse_data_path(data_path: str | list[str]) -> list[tuple[str, float | None]]:
    """`a.jsonl:0.7,b.jsonl:0.3` -> [("a.jsonl", 0.7), ("b.jsonl", 0.3)]; `a.jsonl,b.jsonl` -> [(.., None), ..].

    A trailing `:number` is a weight unless the whole entry names an existing file. Weights are all or nothing: a
    list where some files have one and others not raises UsageError, as does a weight that is not positive.
    """
    entries = data_path if isinstance(data_path, list) else str(data_path).split(",")
    parsed = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        match = _WEIGHT.match(entry)
        if match and not Path(entry).exists():
            weight = float(match["weight"])
            if not (weight > 0 and math.isfinite(weight)):
                raise UsageError(f"--data_path {entry}: a weight must be a positive number")
            parsed.append((match["path"], weight))
        else:
            path, _, suffix = entry.rpartition(":")
            if path and suffix and not Path(entry).exists() and Path(path).is_file():  # a.jsonl:-1, a.jsonl:abc
                raise UsageError(f"--data_path {entry}: a weight must be a positive number, got {suffix!r}")
            parsed.append((entry, None))
    weighted = [w is not None for _, w in parsed]
    if any(weighted) and not all(weighted):
        raise UsageError(f"--data_path {data_path}: give every file a weight (a.jsonl:0.7,b.jsonl:0.3) or none "
                         "(a.jsonl,b.jsonl: the files one after the other)")
    return parsed


def is_weighted(data_path: str | list[str]) -> bool:
    return any(w is not None for _, w in parse_data_path(data_path))


def plain_paths(data_path: str | list[str]) -> list[str]:
    """The files of an unweighted data path; UsageError if it has weights (a weighted one is several sources)."""
    sources = parse_data_path(data_path)
    if any(w is not None for _, w in sources):
        raise UsageError(f"{data_path}: weighted sources are mixed by the dataset, not read as one file list")
    return [path for path, _ in sources]


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many items each source gives to an epoch of sum(sizes) items: proportional to the weights, rounded by
    largest remainder so they add up exactly."""
    total = sum(sizes)
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(shares).astype(np.int64)
    for i in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def mix_indices(sizes: list[int], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, item) index arrays of a weighted epoch, in a seeded random order."""
    rng = np.random.default_rng(seed)
    sources, items = [], []
    for source, (size, count) in enumerate(zip(sizes, mix_counts(sizes, weights))):
        if size == 0 or count == 0:
            continue
        passes = [rng.permutation(size) for _ in range(-(-count // size))]
        items.append(np.concatenate(passes)[:count])
        sources.append(np.full(count, source, dtype=np.int64))
    if not sources:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    source_ids, item_ids = np.concatenate(sources), np.concatenate(items)
    order = rng.permutation(len(source_ids))
    return source_ids[order], item_ids[order]
