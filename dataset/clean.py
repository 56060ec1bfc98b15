"""Cleaning a corpus before it is tokenized: quality filters, exact and near-duplicate removal, and a report of what
each step removed, with examples. `python -m scripts.clean_data` runs it on a file.

Each record goes through the steps in this order and is removed by the first that rejects it:

    length          fewer than min_chars or more than max_chars characters
    junk            more than max_junk of its characters are control characters (other than tab and newlines),
                    private-use, unassigned or U+FFFD (what a wrong decoding leaves)
    script          with --script cjk|latin: less than min_script of its letters in that script
    repeated_lines  more than max_repeated_lines of its non-empty lines are copies of an earlier line in it
    repeated_ngrams more than max_repeated_ngrams of its character n-grams (n = ngram) occur more than once in it
                    (a text that loops, "好的好的好的...", or boilerplate pasted twice)
    duplicate       the same text, up to whitespace, as a record kept earlier
    near_duplicate  a MinHash (datasketch) estimate of Jaccard similarity of character 5-gram sets at or above
                    near_threshold against a record kept earlier (LSH finds the candidates)

Pretraining records ({"text"}) are judged on their text. Chat records are judged on what the assistant says (its
answers and reasoning) for quality, and on the whole conversation for duplicates: the same short answer to different
questions ("好评") is not a duplicate. Kept records that may teach the wrong thing (an empty answer, no user turn, a
NUL character: dataset.formats.suspect_reasons) are kept, and counted in the report by reason with their lines.
Records are read as a stream and kept records are written as their original
lines; only the duplicate index (a hash per kept record, and the LSH tables) grows with the file.
"""

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataset.errors import DataError, SkipCounter, SuspectCounter
from dataset.formats import parse_record, raw_records, suspect_reasons
from dataset.io import atomic_path, atomic_write_json, check_writable_file

STEPS = ("length", "junk", "script", "repeated_lines", "repeated_ngrams", "duplicate", "near_duplicate")
SCRIPTS = {
    # Han (with extension A and compatibility ideographs), kana, Hangul: the letters of CJK text.
    "cjk": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]"),
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
}
SHINGLE = 5  # characters per shingle for near-duplicates


@dataclass
class CleanConfig:
    kind: str = "pretrain"  # "pretrain" or "chat"
    min_chars: int = 5
    max_chars: int = 200_000
    max_junk: float = 0.01
    script: str | None = None  # "cjk", "latin" or None (no script filter)
    min_script: float = 0.5
    max_repeated_lines: float = 0.3
    ngram: int = 10
    max_repeated_ngrams: float = 0.3
    near_threshold: float = 0.8
    num_perm: int = 128
    samples: int = 5  # removed examples kept per step for the report
    skip_bad: bool = False


def _junk(char: str) -> bool:
    if char in "\t\n\r":
        return False
    return char == "\ufffd" or unicodedata.category(char) in ("Cc", "Co", "Cs", "Cn")


def junk_share(text: str) -> float:
    return sum(map(_junk, text)) / max(1, len(text))


def script_share(text: str, script: str) -> float:
    """Share of the letters in `text` that belong to `script`."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return len(SCRIPTS[script].findall("".join(letters))) / len(letters)


def repeated_line_share(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if len(lines) > 1 else 0.0


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the text's character n-grams that occur more than once in it (0 for texts under 2n characters)."""
    if len(text) < 2 * n:
        return 0.0
    counts = Counter(text[i:i + n] for i in range(len(text) - n + 1))
    return sum(c for c in counts.values() if c > 1) / (len(text) - n + 1)


def _normalised(text: str) -> str:
    return " ".join(text.split())


def record_texts(record: dict, kind: str) -> tuple[str, str]:
    """(the text quality is judged on, the text duplicates are judged on) of a canonical record."""
    if kind == "pretrain" or "text" in record:  # a chat file may hold documents (pretraining text to replay)
        return record["text"], record["text"]
    said = [part for m in record["messages"] if m["role"] == "assistant"
            for part in (m.get("reasoning_content", ""), m["content"]) if part]
    whole = "\n".join(f"{m['role']}: {m.get('reasoning_content', '')}{m['content']}" for m in record["messages"])
    return "\n".join(said), whole


@dataclass
class Report:
    read: int = 0
    kept: int = 0
    removed: dict = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    removed_chars: dict = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    samples: dict = field(default_factory=lambda: {step: [] for step in STEPS})
    bad_records: int = 0
    suspect: dict = field(default_factory=dict)  # SuspectCounter.to_dict() of the kept records

    def summary(self) -> str:
        lines = [f"read {self.read:,} records, kept {self.kept:,} ({self.kept / max(1, self.read):.1%})"]
        for step in STEPS:
            if self.removed[step]:
                lines.append(f"  {step:<16} removed {self.removed[step]:>8,} ({self.removed[step] / self.read:.1%}), "
                             f"{self.removed_chars[step]:,} characters")
        if self.bad_records:
            lines.append(f"  {'bad records':<16} skipped {self.bad_records:>8,}")
        return "\n".join(lines)


class Cleaner:
    """Judges records one at a time (`verdict`), remembering the kept ones for the duplicate steps."""

    def __init__(self, config: CleanConfig):
        from datasketch import MinHashLSH

        if config.script is not None and config.script not in SCRIPTS:
            raise ValueError(f"unknown script {config.script!r}; expected one of {sorted(SCRIPTS)}")
        self.config = config
        self.seen: set[bytes] = set()
        self.lsh = MinHashLSH(threshold=config.near_threshold, num_perm=config.num_perm)
        self.n_kept = 0

    def _minhash(self, text: str):
        from datasketch import MinHash

        text = _normalised(text)
        shingles = {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}
        minhash = MinHash(num_perm=self.config.num_perm, seed=1)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def verdict(self, quality_text: str, duplicate_text: str) -> str | None:
        """The step that removes this record, or None to keep it (and remember it)."""
        c, text = self.config, quality_text
        if not c.min_chars <= len(text) <= c.max_chars:
            return "length"
        if junk_share(text) > c.max_junk:
            return "junk"
        if c.script and script_share(text, c.script) < c.min_script:
            return "script"
        if repeated_line_share(text) > c.max_repeated_lines:
            return "repeated_lines"
        if repeated_ngram_share(text, c.ngram) > c.max_repeated_ngrams:
            return "repeated_ngrams"
        digest = hashlib.blake2b(_normalised(duplicate_text).encode("utf-8"), digest_size=16).digest()
        if digest in self.seen:
            return "duplicate"
        minhash = self._minhash(duplicate_text)
        if self.lsh.query(minhash):
            return "near_duplicate"
        self.seen.add(digest)
        self.lsh.insert(str(self.n_kept), minhash)
        self.n_kept += 1
        return None


def _as_line(payload) -> bytes:
    """A kept record as one JSON line: a JSONL line as it was, an array element or parquet row re-encoded."""
    if isinstance(payload, bytes):
        return payload if payload.endswith(b"\n") else payload + b"\n"
    return (json.dumps(payload, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def clean_file(data_path: str, out_path: str, config: CleanConfig, report_path: str | None = None,
               quiet: bool = False) -> Report:
    """Clean one file (.jsonl, .json array or .parquet) into `out_path` (JSON lines: the kept records' original
    lines, or the records themselves for arrays and parquet); writes the report as JSON beside it
    (`<out>.report.json` unless report_path) and returns it."""
    from tqdm import tqdm

    if config.kind not in ("pretrain", "chat"):
        raise ValueError(f"unknown kind {config.kind!r}; expected pretrain or chat")
    check_writable_file(out_path, "--out")
    check_writable_file(report_path or f"{out_path}.report.json", "--report")
    cleaner, report, skipped, suspect = Cleaner(config), Report(), SkipCounter(), SuspectCounter()
    size = Path(data_path).stat().st_size if Path(data_path).is_file() else None
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out, \
            tqdm(total=size, unit="B", unit_scale=True, desc=Path(data_path).name,
                 disable=True if quiet else None) as bar:  # None: a bar on a terminal only, not in log files
        for line, where, payload in raw_records(data_path):
            bar.update(len(payload) if isinstance(payload, bytes) else 0)
            try:
                record = parse_record(payload, config.kind, data_path, line, where)
            except DataError as err:
                if not config.skip_bad:
                    raise
                skipped.add(err)
                report.bad_records += 1
                continue
            report.read += 1
            quality_text, duplicate_text = record_texts(record, config.kind)
            step = cleaner.verdict(quality_text, duplicate_text)
            if step is None:
                report.kept += 1
                out.write(_as_line(payload))
                suspect.add_record(data_path, line, [where + reason for reason in suspect_reasons(record, config.kind)])
                continue
            report.removed[step] += 1
            report.removed_chars[step] += len(quality_text)
            if len(report.samples[step]) < config.samples:
                report.samples[step].append({"line": line, "text": quality_text[:300]})
    report.suspect = suspect.to_dict()
    if not quiet:
        print(f"{data_path} -> {out_path}: {report.summary()}")
        if skipped.total:
            print(f"{data_path}: {skipped.summary()}")
        if suspect.total:
            print(f"{data_path}: {suspect.summary()}")
    atomic_write_json(report_path or f"{out_path}.report.json",
                      {"source": str(data_path), "out": str(out_path), "config": asdict(config), **asdict(report)})
    return report

