"""Atomic file writes: write under a temporary name in the same folder, then rename into place.

A rename within one filesystem replaces the old file in one step, so a reader (or a run killed halfway) sees
either the old file or the new one, never half of one. Every file the project writes that something else reads
back (checkpoints, token bins and their indexes, metrics, plots, reports, the demo corpus) goes through here.
"""

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dataset.errors import UsageError


def make_dir(path: str | os.PathLike, what: str) -> None:
    """mkdir -p, with a usage error (not a traceback) when a file stands where the folder `what` names goes."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{what} {path}: a file is in the way of the folder") from None


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """A usage error, before any work, when the file `what` names would replace a folder."""
    if Path(path).is_dir():
        raise UsageError(f"{what} {path} is a folder; name the file to write")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` for the caller to write; renamed to `path` when the block ends normally,
    removed when it raises (or is interrupted). The name is hidden, unique per call and keeps `path`'s suffix
    (`.loss.tmp-1a2b3c4d.png`), so writers that pick a format from the suffix still work. Nothing is created
    until the caller writes, so the file gets the usual permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> None:
    """Write obj as JSON (UTF-8, non-ASCII kept as is, a newline at the end) to path atomically; further keyword
    arguments go to json.dumps (e.g. default=str)."""
    dumps_kwargs.setdefault("ensure_ascii", False)
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")
