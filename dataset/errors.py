"""Errors for bad input and user mistakes: every message names the file, the line and what is wrong; entry points
turn them into one `error: ...` line and exit status 2 (exit_cleanly_on_bad_input)."""

import errno
import functools
import re
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

# Details that differ from line to line but not from one kind of problem to another: the JSON column, the
# offending byte, the keys a record had, the index of a message, the record number in a JSON array.
_DETAILS = [
    (re.compile(r"^record \d+: "), ""),
    (re.compile(r" \((?:column|byte) \d+\)"), ""),
    (re.compile(r" \(keys seen: [^)]*\)"), ""),
    (re.compile(r"\[\d+\]"), "[n]"),
]


class UsageError(Exception):
    """A mistake the user can fix (a missing directory, a bad flag value): printed as one line."""


class DataError(ValueError):
    """A record that cannot be used. str(err) is `path:line: reason` (line omitted when 0)."""

    def __init__(self, path: str, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.path}:{line}: {reason}" if line else f"{self.path}: {reason}")

    def __reduce__(self):  # pickle by fields (the default would call DataError(message))
        return DataError, (self.path, self.line, self.reason)


def reason_kind(reason: str) -> str:
    """The kind of problem a reason names, without its per-line details: what --skip_bad counts by.

    "invalid JSON: Expecting ',' delimiter (column 17)" -> "invalid JSON: Expecting ',' delimiter";
    "conversations[3] has no 'role'" -> "conversations[n] has no 'role'".
    """
    for pattern, replacement in _DETAILS:
        reason = pattern.sub(replacement, reason)
    return reason


class SkipCounter:
    """Counts lines skipped under --skip_bad, by kind of reason, for the end-of-read report."""

    SHOWN = 6  # reasons spelled out in summary(); the rest are counted together

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.first: DataError | None = None

    def add(self, err: DataError) -> None:
        kind = reason_kind(err.reason)
        self.by_reason[kind] += 1
        self.examples.setdefault(kind, self.example(err, kind))
        if self.first is None:
            self.first = err

    @staticmethod
    def example(err: DataError, kind: str) -> str:
        """How summary() names the first record of a kind: `file:line: reason`, with the reason's details."""
        return str(err)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def merge(self, other: "SkipCounter") -> None:
        self.by_reason.update(other.by_reason)
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)
        if self.first is None:
            self.first = other.first

    def heading(self) -> str:
        return f"skipped {self.total} bad lines"

    def summary(self) -> str:
        """One line: how many lines were skipped, then each kind of reason with its count and a first example."""
        if not self.total:
            return self.heading()
        ranked = self.by_reason.most_common()
        parts = [f"{n} x {reason} (e.g. {self.examples[reason]})" for reason, n in ranked[: self.SHOWN]]
        if len(ranked) > self.SHOWN:
            rest = ranked[self.SHOWN :]
            parts.append(f"{sum(n for _, n in rest)} x {len(rest)} other reasons")
        return f"{self.heading()}: " + "; ".join(parts)

    def to_dict(self) -> dict:
        """A JSON-ready copy (dataset.bins keeps it in a bin's index, so a cached bin can report it again)."""
        first = None if self.first is None else [self.first.path, self.first.line, self.first.reason]
        return {"by_reason": dict(self.by_reason), "examples": self.examples, "first": first}

    @classmethod
    def from_dict(cls, data: dict) -> "SkipCounter":
        counter = cls()
        counter.by_reason.update(data.get("by_reason", {}))
        counter.examples.update(data.get("examples", {}))
        if data.get("first"):
            counter.first = DataError(*data["first"])
        return counter

    @classmethod
    def of_cache(cls, cached: dict, skip_bad: bool) -> "SkipCounter":
        """What a cached preparation (one made with --skip_bad) skipped; without --skip_bad this run stops at its
        first bad line, as it would have without the cache."""
        skipped = cls.from_dict(cached.get("skipped", {}))
        if skipped.total and not skip_bad:
            raise skipped.first
        return skipped


class SuspectCounter(SkipCounter):
    """Counts records that were read and are trained on, though they may teach the model the wrong thing or nothing
    (dataset.formats.suspect_reasons: an empty answer, no user turn, a DPO pair whose sides are equal, a NUL
    character): nothing is skipped, the data summary says how many and where, by reason."""

    def __init__(self) -> None:
        super().__init__()
        self.records = 0  # a record may have several reasons

    def add_record(self, path: str, line: int, reasons: list[str]) -> None:
        """One record's reasons (none: nothing to count); `line` as DataError takes it, reasons prefixed with the
        record's "record N: " where the file is an array or parquet."""
        if reasons:
            self.records += 1
            for reason in reasons:
                self.add(DataError(path, line, reason))

    @staticmethod
    def example(err: DataError, kind: str) -> str:
        """`file:line` alone (`file: record N` for parquet): the reason is already named beside it."""
        return str(err).removesuffix(f": {kind}")

    def merge(self, other: SkipCounter) -> None:
        super().merge(other)
        self.records += getattr(other, "records", other.total)

    def heading(self) -> str:
        return f"kept {self.records} record{'s' * (self.records != 1)} that may teach the wrong thing"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "records": self.records}

    @classmethod
    def from_dict(cls, data: dict) -> "SuspectCounter":
        counter = super().from_dict(data)
        counter.records = data.get("records", counter.total)
        return counter


def exit_cleanly_on_bad_input(main: Callable[[], Any]) -> Callable[[], Any]:
    """Run an entry point's main(); a bad record or user mistake prints `error: ...` and exits 2, Ctrl-C prints
    `interrupted` and exits 130 (as a shell reports it), no traceback either way."""

    @functools.wraps(main)
    def wrapper():
        try:
            return main()
        except (DataError, UsageError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"error: the disk is full writing {err.filename or 'a file'}; every file is written aside and "
                  "renamed, so the last complete one is intact: free space, then run again (training: --resume)",
                  file=sys.stderr)
            sys.exit(2)
        except BrokenProcessPool:  # dataset/workers.py: a tokenizer process was killed
            print("error: a worker process died while preparing data (killed, or out of memory?); nothing half-done "
                  "was kept: run again, with a smaller --num_workers if memory is short", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves a checkpoint first; see trainer/)
            print("interrupted: every file is written aside and renamed when complete, so nothing half-written is "
                  "left under its real name", file=sys.stderr)
            sys.exit(130)

    return wrapper
