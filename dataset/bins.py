"""Token bins: a pretraining file tokenized once, in parallel, into a uint16 token file that training memory-maps.

Reads JSON lines (streamed: a file larger than memory is fine), a JSON array or a parquet file of {"text"} records.
Writes `<bin_dir>/<stem>.<key>.bin` (every document's tokens followed by <|endoftext|>, exact duplicate
documents dropped) and `<stem>.<key>.json`, an index naming the source file, its size and mtime, the tokenizer's
hash, what --skip_bad skipped and the documents kept that hold a NUL character (dataset.formats.suspect_reasons).
The key derives from the tokenizer hash and the source path, so another tokenizer gets its own files; a run whose
index still matches the source and tokenizer reuses the bin ("cached").

`prepare_bins` is the whole step; `python -m scripts.prepare_data` runs it from the command line, and
train_pretrain.py calls it before training.
"""

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.errors import DataError, SkipCounter, SuspectCounter
from dataset.formats import file_format, parse_record, raw_records, suspect_reasons
from dataset.io import atomic_path, atomic_write_json, make_dir
from dataset.tokenizer import ENDOFTEXT
from dataset.workers import ordered_results

EOT_TOKEN = ENDOFTEXT
LINES_PER_CHUNK = 2048
DTYPE = np.uint16
RawRecord = tuple[int, str, object]  # (line, where, payload) as dataset.formats.raw_records gives them
# A longer document is tokenized in pieces of about this many characters: the tokenizer is faster on the pieces
# than on one long string, and the pieces spread over its threads (docs/performance.md: "Tokenizer training and
# token bins").
PIECE_CHARS = 1 << 14
SENTENCE_MARKS = "。！？；，、：,.!?;:"

# Set once in each worker process by _init_worker.
_tokenizer = None
_source = ""
_eot_id = 0


def _init_worker(tokenizer_file: str, source: str, eot_id: int) -> None:
    from tokenizers import Tokenizer

    global _tokenizer, _source, _eot_id
    _tokenizer = Tokenizer.from_file(tokenizer_file)
    _source, _eot_id = source, eot_id


def _cut(text: str, lo: int, hi: int) -> int:
    """Where to end a piece that starts before `lo`: at the last space in [lo, hi) that follows a non-space, else
    after the last sentence mark followed by a letter, else at hi. Byte-level BPE never merges across those
    places, so the pieces' tokens are the whole text's (for other pre-tokenizers, all but a few at each cut)."""
    at = hi
    while (at := text.rfind(" ", lo, at)) > lo:
        if not text[at - 1].isspace():
            return at
    for at in sorted((text.rfind(mark, lo, hi - 1) for mark in SENTENCE_MARKS), reverse=True):
        if at > lo and text[at + 1].isalnum():
            return at + 1
    return hi


def _pieces(text: str) -> list[str]:
    """A document as consecutive pieces of at most PIECE_CHARS characters (see _cut); short ones stay whole."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = _cut(text, start + PIECE_CHARS // 2, start + PIECE_CHARS)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _tokenize_chunk(
    chunk: tuple[list[RawRecord], int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, list, int]:
    """One chunk of raw records (see dataset.formats.raw_records) -> (uint16 tokens of every document each
    followed by end-of-text, per-document token counts, per-document text hashes, [(line, reason)] for bad
    records, [(document, line, [reasons])] for suspect ones, progress made). Bad records come back as reasons, not
    exceptions, so the parent decides to stop or skip and names the right line; suspect ones are tokenized, and the
    parent counts those it keeps (not an exact duplicate)."""
    records, progress = chunk
    texts, errors, suspects = [], [], []
    for line, where, payload in records:
        try:
            record = parse_record(payload, "pretrain", _source, line, where)
        except DataError as err:
            errors.append((line, err.reason))
            continue
        if reasons := suspect_reasons(record, "pretrain"):
            suspects.append((len(texts), line, [where + reason for reason in reasons]))
        texts.append(record["text"])
    pieces, owner = [], []
    for doc, text in enumerate(texts):
        parts = _pieces(text)
        pieces += parts
        owner += [doc] * len(parts)
    encodings = _tokenizer.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
    eot = np.array([_eot_id], dtype=DTYPE)
    ids = []
    for i, encoding in enumerate(encodings):
        ids.append(np.asarray(encoding.ids, dtype=DTYPE))
        if i + 1 == len(owner) or owner[i + 1] != owner[i]:
            ids.append(eot)  # the document's last piece
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=DTYPE)
    lengths = np.ones(len(texts), dtype=np.int64)  # the end-of-text token
    np.add.at(lengths, owner, [len(e.ids) for e in encodings])
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") for t in texts],
        dtype=np.uint64,
    )
    return tokens, lengths, hashes, errors, suspects, progress


def _read_chunks(path: str) -> Iterator[tuple[list[RawRecord], int]]:
    """(raw records, progress) chunks of a file, read lazily; progress counts the bytes of JSON lines, else
    records. A missing, undecodable or empty file raises DataError here, in the parent."""
    records, progress = [], 0
    for record in raw_records(path):
        records.append(record)
        progress += len(record[2]) if isinstance(record[2], bytes) else 1
        if len(records) == LINES_PER_CHUNK:
            yield records, progress
            records, progress = [], 0
    if records:
        yield records, progress


def tokenizer_hash(tokenizer_file: Path) -> str:
    """First 16 hex digits of the sha256 of tokenizer.json's bytes."""
    return hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()[:16]


def bin_paths(data_path: str, tokenizer_digest: str, bin_dir: str) -> tuple[Path, Path]:
    """(bin, index) paths for a source file and tokenizer."""
    source = str(Path(data_path).resolve())
    key = hashlib.sha256(f"{source}\0{tokenizer_digest}".encode()).hexdigest()[:12]
    stem = Path(data_path).stem
    return Path(bin_dir) / f"{stem}.{key}.bin", Path(bin_dir) / f"{stem}.{key}.json"


def _cached_index(index_path: Path, bin_path: Path, source_stat: os.stat_result, digest: str) -> dict | None:
    """The existing index if it still describes this source, this tokenizer and a complete bin (see prepare_bins
    for what a bin made with --skip_bad means to a run without it)."""
    if not (index_path.is_file() and bin_path.is_file()):
        return None
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    matches = (
        index.get("source_size") == source_stat.st_size
        and index.get("source_mtime_ns") == source_stat.st_mtime_ns
        and index.get("tokenizer_hash") == digest
        and bin_path.stat().st_size == index.get("n_tokens", -1) * np.dtype(DTYPE).itemsize
        and (not index.get("n_skipped") or "skipped" in index)
    )
    return index if matches else None


def prepare_bins(
    data_path: str,
    tokenizer_dir: str,
    bin_dir: str,
    num_workers: int = 0,
    skip_bad: bool = False,
    quiet: bool = False,
) -> dict:
    """Tokenize a pretraining file (.jsonl, .json array, .parquet) into a uint16 bin (or reuse a matching one);
    returns the index dict, whose "bin_path" is what PretrainDataset reads. Bad records raise DataError(file, line,
    reason) unless skip_bad, in which case they are counted in "n_skipped" and, by reason, in "skipped"; documents
    kept that may teach the wrong thing (a NUL character) are counted in "suspect", and trained on. A cached
    bin that was made by skipping bad records is reused only with skip_bad; without it the first bad record
    raises, as it would have on a fresh read."""
    say = (lambda *a: None) if quiet else print
    source = Path(data_path)
    if not source.is_file():
        raise DataError(data_path, 0, "no such file" if not source.exists() else "not a file")
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file}: no tokenizer.json here; train one with train_tokenizer.py")
    digest = tokenizer_hash(tokenizer_file)
    bin_path, index_path = bin_paths(data_path, digest, bin_dir)
    source_stat = source.stat()
    cached = _cached_index(index_path, bin_path, source_stat, digest)
    if cached is not None:
        skipped = SkipCounter.of_cache(cached, skip_bad)
        suspect = SuspectCounter.from_dict(cached.get("suspect", {}))  # an index from before the count: none
        say(f"{data_path}: cached -> {bin_path} ({cached['n_tokens']:,} tokens)")
        if skipped.total:
            say(f"{data_path}: {skipped.summary()}")
        if suspect.total:
            say(f"{data_path}: {suspect.summary()}")
        return {**cached, "bin_path": str(bin_path)}

    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise DataError(str(tokenizer_file), 0, f"not a readable tokenizer ({err})") from None
    if tokenizer.get_vocab_size() > np.iinfo(DTYPE).max + 1:
        raise DataError(str(tokenizer_file), 0, f"vocabulary of {tokenizer.get_vocab_size()} tokens does not "
                                                f"fit in uint16 (at most {np.iinfo(DTYPE).max + 1}); use a smaller "
                                                "tokenizer")
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    if eot_id is None:
        raise DataError(str(tokenizer_file), 0, f"no {EOT_TOKEN} token to separate documents")

    make_dir(bin_path.parent, "the token bins' folder (--bin_dir)")
    skipped, suspect = SkipCounter(), SuspectCounter()
    seen: set[int] = set()
    n_docs = n_tokens = n_duplicates = 0
    start = time.perf_counter()
    streamed = file_format(data_path) == "jsonl"  # progress in bytes, else in records
    bar = dict(total=source_stat.st_size, unit="B", unit_scale=True) if streamed else dict(unit=" records")
    init_args = (str(tokenizer_file), str(data_path), eot_id)
    # Written aside and renamed into place when complete: a bin under its real name is always whole.
    with atomic_path(bin_path) as tmp_bin:
        # disable=None: no bar when stderr is not a terminal (in a log every redraw would be another line)
        with (open(tmp_bin, "wb") as out, tqdm(desc=source.name, disable=quiet or None, **bar) as progress,
              ordered_results(_tokenize_chunk, _read_chunks(data_path), num_workers, _init_worker,
                              init_args) as results):
            for tokens, lengths, hashes, errors, suspects, done in results:
                progress.update(done)
                for lineno, reason in errors:
                    err = DataError(data_path, lineno, reason)
                    if not skip_bad:
                        raise err
                    skipped.add(err)
                keep = np.ones(len(lengths), dtype=bool)
                for i, text_hash in enumerate(hashes.tolist()):
                    keep[i] = text_hash not in seen
                    seen.add(text_hash)
                for doc, lineno, reasons in suspects:
                    if keep[doc]:  # not an exact duplicate of a document before it
                        suspect.add_record(data_path, lineno, reasons)
                if not keep.all():
                    tokens = tokens[np.repeat(keep, lengths)]
                out.write(tokens.tobytes())
                n_docs += int(keep.sum())
                n_duplicates += int((~keep).sum())
                n_tokens += len(tokens)
        if n_docs == 0:
            raise DataError(data_path, 0, f"no usable documents; {skipped.summary()}")
    seconds = time.perf_counter() - start
    index = {
        "source": str(source.resolve()),
        "source_size": source_stat.st_size,
        "source_mtime_ns": source_stat.st_mtime_ns,
        "tokenizer_hash": digest,
        "n_docs": n_docs,
        "n_tokens": n_tokens,
        "n_duplicates": n_duplicates,
        "n_skipped": skipped.total,
        "skipped": skipped.to_dict(),
        "suspect": suspect.to_dict(),
        "dtype": np.dtype(DTYPE).name,
        "eot_id": eot_id,
        "seconds": round(seconds, 3),
    }
    atomic_write_json(index_path, index)  # written last: a bin without its index is never trusted
    say(
        f"{data_path} -> {bin_path}: {n_docs:,} documents, {n_tokens:,} tokens, {n_duplicates:,} duplicates "
        f"dropped, {skipped.total:,} skipped, {source_stat.st_size / 1e6 / seconds:.1f} MB/s, "
        f"{n_tokens / seconds:,.0f} tokens/s"
    )
    if skipped.total:
        say(f"{data_path}: {skipped.summary()}")
    if suspect.total:
        say(f"{data_path}: {suspect.summary()}")
    return {**index, "bin_path": str(bin_path)}
