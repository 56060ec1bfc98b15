"""Errors for bad input data: every message names the file, the line and what is wrong."""

from collections import Counter


class DataError(ValueError):
    """A record that cannot be used. str(err) is `path:line: reason` (line omitted when 0)."""

    def __init__(self, path: str, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.path}:{line}: {reason}" if line else f"{self.path}: {reason}")


class SkipCounter:
    """Counts lines skipped under --skip_bad, by reason, for the end-of-read report."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, err: DataError) -> None:
        self.by_reason[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def merge(self, other: "SkipCounter") -> None:
        self.by_reason.update(other.by_reason)
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 bad lines"
        parts = [f"{n} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.by_reason.most_common()]
        return f"skipped {self.total} bad lines: " + "; ".join(parts)
