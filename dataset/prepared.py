"""Prepared chat data: SFT / LoRA / distillation conversations, DPO pairs and RL prompt sets tokenized once, in
parallel worker processes, into token files that every run and every rank memory-maps.

A prepared source is four or five files in the cache directory, named `<stem>.<stage>.<key>.*`:

    .tokens.bin    every conversation's token ids, one after the other (uint16, or uint32 for vocabularies over 65,536)
    .mask.bin      one uint8 per token: 1 where the token is trained on (assistant output), else 0
    .offsets.bin   int64 [n_pieces + 1]: piece k is tokens[offsets[k]:offsets[k + 1]]; a piece is a conversation
                   (sft), one of (prompt, chosen, rejected) for each pair (dpo), or a prompt (rl)
    .meta.jsonl    rl only: one JSON line per prompt, its canonical record {"messages", "meta"} (meta: task, answer,
                   ... for the reward functions); .meta_offsets.bin indexes it
    .json          the index, written last: source files with their size and mtime, the tokenizer's hash, the
                   options, counts (with what --skip_bad skipped and the suspect records kept, by reason, so a
                   cached run reports them again), and each data file's size; a preparation killed before it
                   leaves nothing that is later trusted (data files are written under temporary names and renamed,
                   the old index is removed before any of them is replaced)

The key is a hash of the source paths, the tokenizer's hash, the chat template and every option that changes the
tokens (sft: max_seq_len, and the system-prompt ratio, prompts and seed when the ratio is above 0; dpo: the clip
budget, which follows max_seq_len); a changed source file (size or mtime) is prepared again under the same name.
Packing, shuffling and DPO windows are computed when the files are read, from the offsets alone.

Memory stays flat: the source is read in chunks of lines that at most 2 * workers + 2 at a time are in flight, and
results are appended to the files as they come back.
"""

import hashlib
import inspect
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset import chat
from dataset.bins import _read_chunks
from dataset.chat import chat_segments, record_segments
from dataset.errors import DataError, SkipCounter, SuspectCounter
from dataset.formats import file_format, parse_record, suspect_reasons
from dataset.io import atomic_path, atomic_write_json, make_dir
from dataset.workers import ordered_results

FORMAT_VERSION = 1
STAGES = ("sft", "dpo", "rl")
KIND = {"sft": "chat", "dpo": "dpo"}
DATA_FILES = {"sft": ("tokens", "mask", "offsets"), "dpo": ("tokens", "mask", "offsets"),
              "rl": ("tokens", "offsets", "meta", "meta_offsets")}
SUFFIX = {"tokens": ".tokens.bin", "mask": ".mask.bin", "offsets": ".offsets.bin", "meta": ".meta.jsonl",
          "meta_offsets": ".meta_offsets.bin"}


# --- what the cache is keyed by ----------------------------------------------------------------------------------

def tokenizer_digest(tokenizer) -> str:
    """First 16 hex digits of the sha256 of the tokenizer's full serialisation (vocabulary, merges, special
    tokens, normaliser, pre-tokenizer)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def template_digest() -> str:
    """A hash of the chat template as both renderings define it: the Jinja string and the Python code."""
    parts = [chat.CHAT_TEMPLATE, chat.TOOLS_INTRO, chat.TOOLS_OUTRO, inspect.getsource(chat.chat_segments),
             inspect.getsource(chat._assistant_body), inspect.getsource(chat.document_segments)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def clip_budget(tokenizer, max_seq_len: int) -> int:
    """How many characters from either end of one text are enough for any window of max_seq_len + 1 tokens.

    No token covers more characters than its vocabulary entry is long (byte-level entries spell one byte per
    character, and a character is at least one byte), so this many characters hold more than a window's tokens,
    with 64 to spare for the merges next to a cut.
    """
    return (max_seq_len + 1 + 64) * max(map(len, tokenizer.get_vocab()))


def clip_text(text: str, budget: int) -> str:
    """A text longer than 2 * budget characters keeps only its first and last `budget` characters."""
    return text if len(text) <= 2 * budget else text[:budget] + text[-budget:]


def clip_long_texts(messages: list[dict], budget: int) -> list[dict]:
    """Messages whose content or reasoning is longer than 2 * budget characters keep only their first and last
    `budget` characters (clip_text). Tokenizing a 10 MB message takes seconds and every token past the window is cut
    anyway; with both ends kept, the tokens a window can hold are the same whether it keeps a text's start (SFT, DPO)
    or, for a long DPO prompt, its end."""
    if all(len(m.get("content") or "") <= 2 * budget and len(m.get("reasoning_content") or "") <= 2 * budget
           for m in messages):
        return messages  # the usual case: nothing to clip, no copies
    return [{**m, **{key: clip_text(m[key], budget) for key in ("content", "reasoning_content")
                     if isinstance(m.get(key), str)}} for m in messages]


def clip_record(record: dict, budget: int) -> dict:
    """A canonical chat record with clip_long_texts applied: to its messages, or to a document's text."""
    if "text" in record:
        return {**record, "text": clip_text(record["text"], budget)}
    return {**record, "messages": clip_long_texts(record["messages"], budget)}


# --- worker processes ---------------------------------------------------------------------------------------------

# Set once in each worker process by _init_worker.
_tokenizer = None
_options: dict = {}


def _init_worker(tokenizer_json: str, options: dict) -> None:
    from tokenizers import Tokenizer

    global _tokenizer, _options
    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _options = options


def _encode(segments: list[list[tuple[str, bool]]], dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each group of (text, trained-on) segments tokenized piece by piece, as dataset.chat.tokenize_chat does:
    (token ids of all groups, their 0/1 mask, each group's length)."""
    texts = [text for group in segments for text, _ in group]
    encodings = _tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    seg_lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype,
                      count=int(seg_lengths.sum()))
    outputs = np.fromiter((out for group in segments for _, out in group), dtype=np.uint8, count=len(texts))
    mask = np.repeat(outputs, seg_lengths)
    group_of_segment = np.repeat(np.arange(len(segments)), [len(group) for group in segments])
    lengths = np.bincount(group_of_segment, weights=seg_lengths, minlength=len(segments)).astype(np.int64)
    return ids, mask, lengths


def _parse(records: list, source: str, kind: str) -> tuple[list, list, list]:
    """(canonical records, [(line, reason)] of the bad ones, [(line, [reasons])] of the suspect ones: read all the
    same, see dataset.formats.suspect_reasons)."""
    parsed, errors, suspects = [], [], []
    for line, where, payload in records:
        try:
            record = parse_record(payload, kind, source, line, where)
        except DataError as err:
            errors.append((line, err.reason))
            continue
        parsed.append(record)
        if reasons := suspect_reasons(record, kind):
            suspects.append((line, [where + reason for reason in reasons]))
    return parsed, errors, suspects


def _sft_chunk(chunk: tuple) -> dict:
    """Conversations -> tokens and masks cut to max_seq_len + 1, those with no trained-on token left dropped.
    Per parsed record it also reports its untruncated length, whether it starts without a system turn (so the
    parent draws its --system_prompt_ratio coin in order) and, for those with tools, the messages (the parent
    re-tokenizes the few that get a system prompt: it joins the tool preamble)."""
    source, records, progress = chunk
    window, budget, dtype = _options["window"], _options["budget"], _options["dtype"]
    parsed, errors, suspects = _parse(records, source, "chat")
    conversations = [clip_record(r, budget) for r in parsed]
    ids, mask, lengths = _encode([record_segments(r) for r in conversations], dtype)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(ids)) - np.repeat(starts, lengths)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    in_window = position < window
    trained = np.bincount(owner[in_window & (position >= 1) & (mask == 1)], minlength=len(lengths))
    kept = trained > 0
    keep = in_window & kept[owner]
    # A document (pretraining text) never gets a system prompt.
    eligible = np.array(["messages" in r and r["messages"][0]["role"] != "system" for r in conversations], dtype=bool)
    tools = {i: (r["messages"], r["tools"]) for i, r in enumerate(conversations) if r.get("tools") and eligible[i]} \
        if _options["draws"] else {}
    return {"tokens": ids[keep], "mask": mask[keep], "lengths": np.minimum(lengths, window), "kept": kept,
            "full_lengths": lengths, "eligible": eligible, "tools": tools, "errors": errors, "suspects": suspects,
            "progress": progress, "source": source}


def _dpo_chunk(chunk: tuple) -> dict:
    """Pairs -> three pieces each: the prompt (mask 0), the chosen and the rejected continuation. The prompt's
    segments are the first ones of prompt + response (each message renders on its own), so prompt tokens +
    response tokens are the tokens of the whole conversation, as tokenize_chat gives them."""
    source, records, progress = chunk
    budget, dtype = _options["budget"], _options["dtype"]
    parsed, errors, suspects = _parse(records, source, "dpo")
    pieces = []
    for record in parsed:
        prompt = clip_long_texts(record["prompt"], budget)
        head = len(chat_segments(prompt))
        pieces.append([(text, False) for text, _ in chat_segments(prompt)])
        for response in (record["chosen"], record["rejected"]):
            pieces.append(chat_segments(prompt + clip_long_texts(response, budget))[head:])
    ids, mask, lengths = _encode(pieces, dtype)
    return {"tokens": ids, "mask": mask, "lengths": lengths, "n": len(parsed), "errors": errors,
            "suspects": suspects, "progress": progress, "source": source}


def _rl_chunk(chunk: tuple) -> dict:
    """Prompts (dataset/formats.py's "rl" records) -> their tokens as a generation starts (the template with
    `<|im_start|>assistant\\n` at the end), and each canonical record ({"messages", "meta"}) as one JSON line."""
    source, records, progress = chunk
    parsed, errors, suspects = _parse(records, source, "rl")
    ids, _, lengths = _encode([chat_segments(r["messages"], add_generation_prompt=True) for r in parsed],
                              _options["dtype"])
    meta = [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in parsed]
    return {"tokens": ids, "lengths": lengths, "meta": meta, "errors": errors, "suspects": suspects,
            "progress": progress, "source": source}


CHUNK_FUNCTIONS = {"sft": _sft_chunk, "dpo": _dpo_chunk, "rl": _rl_chunk}


def _chunk_worker(chunk: tuple) -> dict:
    return CHUNK_FUNCTIONS[_options["stage"]](chunk)


# --- the parent: reading, ordering, writing ------------------------------------------------------------------------

def _source_chunks(files: list[str]) -> Iterator[tuple]:
    for path in files:
        for records, progress in _read_chunks(path):
            yield path, records, progress


def cache_paths(files: list[str], stage: str, key: str, cache_dir: str | Path) -> dict[str, Path]:
    """Where a prepared source lives: {"index": ..., "tokens": ..., ...}."""
    stem = Path(files[0]).stem + (f"+{len(files) - 1}" if len(files) > 1 else "")
    base = Path(cache_dir) / f"{stem}.{stage}.{key}"
    paths = {name: base.with_name(base.name + SUFFIX[name]) for name in DATA_FILES[stage]}
    return {"index": base.with_name(base.name + ".json"), **paths}


def _sources(files: list[str]) -> list[dict]:
    return [{"path": str(Path(f).resolve()), "size": (s := Path(f).stat()).st_size, "mtime_ns": s.st_mtime_ns}
            for f in files]


def _cached(paths: dict[str, Path], sources: list[dict]) -> dict | None:
    """The index if it still describes these source files and complete data files."""
    try:
        index = json.loads(paths["index"].read_text())
        if index.get("sources") != sources or index.get("format_version") != FORMAT_VERSION:
            return None
        if any(paths[name].stat().st_size != size for name, size in index["file_bytes"].items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index


def prepare(data_path: str | list[str], stage: str, tokenizer, cache_dir: str | Path, max_seq_len: int = 512,
            skip_bad: bool = False, system_prompt_ratio: float = 0.0, system_prompts: list[str] | None = None,
            seed: int = 0, num_workers: int = 0, quiet: bool = False) -> dict:
    """Tokenize a chat stage's data into prepared files (or find them prepared); returns the index, with "paths".

    `data_path` is one file or a list (or comma-separated list) of files read one after the other. Bad records
    raise DataError(file, line, reason) unless skip_bad; a cache made by skipping bad records is reused only with
    skip_bad (without it, the first bad record raises as a fresh read would). `index["cached"]` says which.
    """
    from dataset.mixing import plain_paths

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    say = (lambda *a: None) if quiet else print
    files = plain_paths(data_path)
    for path in files:
        if not Path(path).is_file():
            raise DataError(path, 0, "no such file" if not Path(path).exists() else "not a file")
    dtype = token_dtype(len(tokenizer))
    options: dict = {"stage": stage, "dtype": dtype.name, "template": template_digest(),
                     "format_version": FORMAT_VERSION}
    if stage == "sft":
        options["max_seq_len"] = max_seq_len
        if system_prompt_ratio > 0:
            from dataset.lm_dataset import DEFAULT_SYSTEM_PROMPTS
            options.update(system_prompt_ratio=system_prompt_ratio, seed=seed,
                           system_prompts=list(system_prompts or DEFAULT_SYSTEM_PROMPTS))
    if stage in ("sft", "dpo"):
        options["budget"] = clip_budget(tokenizer, max_seq_len)
    digest = tokenizer_digest(tokenizer)
    sources = _sources(files)
    key_text = json.dumps({"files": [s["path"] for s in sources], "tokenizer": digest, **options}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    paths = cache_paths(files, stage, key, cache_dir)
    name = ",".join(files)

    cached = _cached(paths, sources)
    if cached is not None:
        skipped = SkipCounter.of_cache(cached, skip_bad)
        suspect = SuspectCounter.from_dict(cached.get("suspect", {}))  # an index from before the count: none
        say(f"{name}: cached -> {paths['index']} ({cached['n_tokens']:,} tokens)")
        if skipped.total:
            say(f"{name}: {skipped.summary()}")
        if suspect.total:
            say(f"{name}: {suspect.summary()}")
        return {**cached, "paths": {k: str(v) for k, v in paths.items()}, "cached": True}

    make_dir(paths["index"].parent, "the prepared files' folder (--cache_dir)")
    paths["index"].unlink(missing_ok=True)  # from here on, nothing under this name is trusted until the new index
    start = time.perf_counter()
    writer = _Writer(stage, tokenizer, options, max_seq_len, system_prompt_ratio, seed, skip_bad)
    worker_options = {**options, "dtype": dtype, "window": max_seq_len + 1, "draws": system_prompt_ratio > 0}
    init_args = (tokenizer.backend_tokenizer.to_str(), worker_options)
    total = sum(s["size"] for s in sources)
    # A bar for JSON lines (progress in bytes), on a terminal only (disable=None): not in pipes and log files.
    streamed = all(file_format(f) == "jsonl" for f in files)
    with ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(paths[name])) for name in DATA_FILES[stage]}
        outs = {name: stack.enter_context(open(tmp[name], "wb")) for name in DATA_FILES[stage]}
        progress = stack.enter_context(tqdm(desc=Path(files[0]).name, total=total, unit="B", unit_scale=True,
                                            disable=True if quiet or not streamed else None))
        results = stack.enter_context(ordered_results(_chunk_worker, _source_chunks(files), num_workers,
                                                      _init_worker, init_args))
        for result in results:
            progress.update(result["progress"])
            writer.add(result, outs)
        writer.finish(outs)
        for out in outs.values():
            out.close()
        file_bytes = {name: tmp[name].stat().st_size for name in DATA_FILES[stage]}
    seconds = time.perf_counter() - start
    index = {"format_version": FORMAT_VERSION, "stage": stage, "sources": sources, "tokenizer_hash": digest,
             "options": options, **writer.counts, "n_skipped": writer.skipped.total,
             "skipped": writer.skipped.to_dict(), "suspect": writer.suspect.to_dict(), "file_bytes": file_bytes,
             "seconds": round(seconds, 3)}
    if writer.rng_state is not None:
        index["rng_state"] = writer.rng_state
    atomic_write_json(paths["index"], index)  # last: data files without their index are never trusted
    counts = ", ".join(f"{v:,} {k.removeprefix('n_')}" for k, v in writer.counts.items())
    say(f"{name} -> {paths['index'].with_suffix('')}.*: {counts}, {writer.skipped.total:,} skipped, "
        f"{total / 1e6 / seconds:.1f} MB/s, {writer.counts['n_tokens'] / seconds:,.0f} tokens/s")
    if writer.skipped.total:
        say(f"{name}: {writer.skipped.summary()}")
    if writer.suspect.total:
        say(f"{name}: {writer.suspect.summary()}")
    return {**index, "paths": {k: str(v) for k, v in paths.items()}, "cached": False}


class _Writer:
    """Appends the workers' results to the open data files, in order; draws the system-prompt coins (sft)."""

    def __init__(self, stage, tokenizer, options, max_seq_len, ratio, seed, skip_bad):
        self.stage, self.tokenizer, self.skip_bad = stage, tokenizer, skip_bad
        self.window, self.ratio = max_seq_len + 1, ratio
        self.dtype = np.dtype(options["dtype"])
        self.skipped, self.suspect = SkipCounter(), SuspectCounter()
        self.end = 0  # tokens written so far: the next offset
        self.rng_state = None
        if stage == "sft":
            self.counts = {"n_conversations": 0, "n_tokens": 0, "n_assistant_tokens": 0, "n_truncated": 0,
                           "n_dropped": 0}
            if ratio > 0:
                from dataset.chat import tokenize_chat

                self.rng = random.Random(seed)
                self.prompts = options["system_prompts"]
                self.prompt_ids = [tokenize_chat(tokenizer, [{"role": "system", "content": p}])[0]
                                   for p in self.prompts]
        elif stage == "dpo":
            self.counts = {"n_pairs": 0, "n_tokens": 0}
        else:
            self.counts = {"n_prompts": 0, "n_tokens": 0}
            self.meta_end = 0
        self.offsets_started = False

    def _offsets(self, lengths: np.ndarray, outs) -> None:
        if not self.offsets_started:
            outs["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
            self.offsets_started = True
        ends = self.end + np.cumsum(lengths, dtype=np.int64)
        outs["offsets"].write(ends.tobytes())
        if len(ends):
            self.end = int(ends[-1])

    def add(self, result: dict, outs) -> None:
        for line, reason in result["errors"]:
            err = DataError(result["source"], line, reason)
            if not self.skip_bad:
                raise err
            self.skipped.add(err)
        for line, reasons in result["suspects"]:
            self.suspect.add_record(result["source"], line, reasons)
        if self.stage == "sft" and self.ratio > 0:
            result = self._draw_system_prompts(result)
        tokens = result["tokens"]
        outs["tokens"].write(tokens.astype(self.dtype, copy=False).tobytes())
        self.counts["n_tokens"] += len(tokens)
        if self.stage == "sft":
            lengths = result["lengths"][result["kept"]]
            mask = result["mask"]
            outs["mask"].write(mask.tobytes())
            self._offsets(lengths, outs)
            starts = np.cumsum(lengths) - lengths
            self.counts["n_conversations"] += len(lengths)
            self.counts["n_assistant_tokens"] += int(mask.sum()) - int(mask[starts].sum()) if len(lengths) else 0
            self.counts["n_truncated"] += int((result["full_lengths"] > self.window).sum())
            self.counts["n_dropped"] += int((~result["kept"]).sum())
        elif self.stage == "dpo":
            outs["mask"].write(result["mask"].tobytes())
            self._offsets(result["lengths"], outs)
            self.counts["n_pairs"] += result["n"]
        else:
            self._offsets(result["lengths"], outs)
            ends = self.meta_end + np.cumsum([len(m) for m in result["meta"]], dtype=np.int64)
            if self.counts["n_prompts"] == 0:
                outs["meta_offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
            outs["meta_offsets"].write(ends.tobytes())
            outs["meta"].write(b"".join(result["meta"]))
            self.meta_end = int(ends[-1]) if len(ends) else self.meta_end
            self.counts["n_prompts"] += len(result["meta"])

    def _draw_system_prompts(self, result: dict) -> dict:
        """--system_prompt_ratio, as the in-memory path draws it: one coin per conversation that has no system
        turn, in file order, and a prompt for each that lands; the chosen prompt's tokens go in front, then the
        conversation is cut to the window again. Only the conversations that get one are touched."""
        rng, window = self.rng, self.window
        drawn = {}
        for i in np.flatnonzero(result["eligible"]).tolist():
            if rng.random() < self.ratio:
                drawn[i] = rng.choice(range(len(self.prompts)))
        if not drawn:
            return result
        kept, lengths, full = result["kept"].copy(), result["lengths"].copy(), result["full_lengths"].copy()
        starts = np.zeros(len(kept) + 1, dtype=np.int64)
        np.cumsum(np.where(kept, lengths, 0), out=starts[1:])
        token_parts, mask_parts = [], []
        at = 0
        for i, choice in sorted(drawn.items()):
            token_parts.append(result["tokens"][at:starts[i]])
            mask_parts.append(result["mask"][at:starts[i]])
            at = starts[i + 1]
            if i in result["tools"]:
                from dataset.chat import tokenize_chat

                messages, tools = result["tools"][i]
                ids, mask = tokenize_chat(self.tokenizer, [{"role": "system", "content": self.prompts[choice]},
                                                           *messages], tools)
                ids, mask = np.asarray(ids, dtype=self.dtype), np.asarray(mask, dtype=np.uint8)
                full[i] = len(ids)
            else:
                prefix = self.prompt_ids[choice]
                ids = np.concatenate([np.asarray(prefix, dtype=self.dtype), result["tokens"][starts[i]:starts[i + 1]]])
                mask = np.concatenate([np.zeros(len(prefix), dtype=np.uint8), result["mask"][starts[i]:starts[i + 1]]])
                full[i] += len(prefix)
            ids, mask = ids[:window], mask[:window]
            kept[i] = kept[i] and bool(mask[1:].any())
            lengths[i] = len(ids)
            if kept[i]:
                token_parts.append(ids)
                mask_parts.append(mask)
        token_parts.append(result["tokens"][at:])
        mask_parts.append(result["mask"][at:])
        return {**result, "tokens": np.concatenate(token_parts), "mask": np.concatenate(mask_parts),
                "kept": kept, "lengths": lengths, "full_lengths": full}

    def finish(self, outs) -> None:
        if self.stage == "sft" and self.ratio > 0:
            state = self.rng.getstate()
            self.rng_state = [state[0], list(state[1]), state[2]]
        if not self.offsets_started:
            outs["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
            self.offsets_started = True
        if self.stage == "rl" and self.counts["n_prompts"] == 0:
            outs["meta_offsets"].write(np.zeros(1, dtype=np.int64).tobytes())


# --- reading prepared files ----------------------------------------------------------------------------------------

class PreparedFiles:
    """The data files of one prepared source, memory-mapped on first use. Pickles as its paths (a DataLoader
    worker started by spawn maps the files itself instead of receiving a copy of them)."""

    def __init__(self, index: dict):
        self.index = index
        self.paths = index["paths"]
        self.dtype = np.dtype(index["options"]["dtype"])
        self._maps: dict[str, np.ndarray] = {}

    def _map(self, name: str, dtype) -> np.ndarray:
        if name not in self._maps:
            empty = self.index["file_bytes"][name] == 0
            self._maps[name] = np.zeros(0, dtype=dtype) if empty else np.memmap(self.paths[name], dtype=dtype,
                                                                                 mode="r")
        return self._maps[name]

    @property
    def tokens(self) -> np.ndarray:
        return self._map("tokens", self.dtype)

    @property
    def mask(self) -> np.ndarray:
        return self._map("mask", np.uint8)

    @property
    def offsets(self) -> np.ndarray:
        return self._map("offsets", np.int64)

    def meta(self, i: int) -> dict:
        ends = self._map("meta_offsets", np.int64)
        with open(self.paths["meta"], "rb") as f:
            f.seek(int(ends[i]))
            return json.loads(f.read(int(ends[i + 1] - ends[i])))

    def __getstate__(self) -> dict:
        return {"index": self.index, "paths": self.paths, "dtype": self.dtype, "_maps": {}}


def once_per_node(make: Callable[[], object], local_rank: int, barrier: Callable[[], None]):
    """make() on each node's first process, then, once it is done (barrier), on the others: the first prepares
    the files, the others find them cached and memory-map the same files."""
    if local_rank == 0:
        made = make()
    barrier()
    if local_rank != 0:
        made = make()
    return made
