"""Datasets that feed the training stages. Each turns prepared data into fixed-shape tensors; none tokenizes
more than once."""

import bisect
import hashlib
import itertools
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.chat import IGNORE_INDEX, record_segments, tokenize_chat, tokenize_segments
from dataset.errors import DataError, SkipCounter, SuspectCounter
from dataset.formats import iter_records
from dataset.io import atomic_path
from dataset.mixing import mix_indices, parse_data_path
from dataset.prepared import PreparedFiles, clip_budget, clip_long_texts, clip_record, prepare


class PretrainDataset(Dataset):
    """Packed pretraining windows over uint16 token files written by dataset/bins.py.

    Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1): input_ids are its first seq_len tokens and
    labels the next token of each position (labels[t] is the target for position t; the model does not
    shift). Windows do not overlap, so one epoch sees each token as a target once; documents run into each
    other, separated by <|endoftext|>, and nothing is padded. Several token files (one per source file) are
    windowed one after the other, each on its own: no window spans two files.
    """

    def __init__(self, bin_paths: str | Path | Sequence[str | Path], seq_len: int,
                 weights: Sequence[float] | None = None, seed: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.bin_paths = [str(bin_paths)] if isinstance(bin_paths, (str, Path)) else [str(p) for p in bin_paths]
        self.seq_len = seq_len
        self.parts = []
        for path in self.bin_paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no token file; make one with `python -m scripts.prepare_data`")
            # mode "r" on an empty file fails in numpy, and an empty bin has no windows anyway.
            empty = Path(path).stat().st_size == 0
            self.parts.append(np.zeros(0, dtype=np.uint16) if empty else np.memmap(path, dtype=np.uint16, mode="r"))
        sizes = [max(0, (len(tokens) - 1) // seq_len) for tokens in self.parts]
        # starts[k]: the index of file k's first window; starts[-1]: the number of windows.
        self.starts = np.cumsum([0] + sizes).tolist()
        # With weights (one per file, dataset/mixing.py), item i is window mixed[1][i] of file mixed[0][i].
        self.mixed = mix_indices(sizes, list(weights), seed) if weights is not None else None

    @property
    def n_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.parts)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        if self.mixed is not None:
            part, window = int(self.mixed[0][i]), int(self.mixed[1][i])
        else:
            part = bisect.bisect_right(self.starts, i) - 1
            window = i - self.starts[part]
        start = window * self.seq_len
        tokens = torch.from_numpy(self.parts[part][start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}


# --- chat stages: prepared files (dataset/prepared.py), or tokenized in memory for comparison ----------------------

# For --system_prompt_ratio: a model that only ever saw chats without a system turn ignores one at inference.
DEFAULT_SYSTEM_PROMPTS = [
    "你是一个乐于助人的AI助手。",
    "你是丹炉，一个小型语言模型，请认真回答用户的问题。",
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "请简洁、准确地回答用户的问题。",
    "You are a helpful assistant.",
]


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of items grouped into rows of at most `capacity` tokens: best-fit decreasing bin packing.

    Longest items first, each into the open row whose free space fits it most tightly, else a new row. Rows end
    up nearly full, so padding stays small. Ties keep the given order (shuffle first for a random packing).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    rows_by_space: dict[int, list[int]] = {}  # free space -> rows with exactly that much left
    spaces: list[int] = []  # the keys of rows_by_space, sorted, for bisect
    for item in order:
        need = lengths[item]
        k = bisect.bisect_left(spaces, need)
        if k == len(spaces):
            row, space = len(rows), capacity
            rows.append([])
        else:
            space = spaces[k]
            row = rows_by_space[space].pop()
            if not rows_by_space[space]:
                del rows_by_space[space]
                spaces.pop(k)
        rows[row].append(item)
        space -= need
        if space > 0:
            if space not in rows_by_space:
                bisect.insort(spaces, space)
                rows_by_space[space] = []
            rows_by_space[space].append(row)
    return rows


class _InMemory:
    """Token arrays built in this process, with the attributes of prepared.PreparedFiles."""

    def __init__(self, tokens: list[list[int]], masks: list[list[int]], index: dict):
        lengths = [len(ids) for ids in tokens]
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.tokens = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=self.offsets[-1])
        self.mask = np.fromiter(itertools.chain.from_iterable(masks), dtype=np.uint8, count=self.offsets[-1])
        self.index = index


class _ChatData(Dataset):
    """What the chat datasets share: their sources, prepared (or tokenized in memory), and the items drawn from
    them: all items of one source (a plain path or comma list of files, read one after the other), or a weighted
    mix of several (dataset/mixing.py)."""

    stage = ""

    def _load(self, path: str, tokenizer, cache_dir: str | Path | None, quiet: bool, in_memory: bool,
              **options) -> None:
        self.path = str(path)
        sources = parse_data_path(path)
        self.weights = [w for _, w in sources] if sources and sources[0][1] is not None else None
        groups = [[p] for p, _ in sources] if self.weights else [[p for p, _ in sources]]
        if not in_memory and cache_dir is None:  # nothing kept after this dataset: a directory of its own
            self._tmp = tempfile.TemporaryDirectory(prefix="danlu-prepared-")
            cache_dir = self._tmp.name
        self.skipped, self.suspect = SkipCounter(), SuspectCounter()
        self.parts = []
        for files in groups:
            if in_memory:
                part = self._in_memory(files, tokenizer, **options)
            else:
                part = PreparedFiles(prepare(files, self.stage, tokenizer, cache_dir, quiet=quiet, **options))
            self.skipped.merge(SkipCounter.from_dict(part.index.get("skipped", {})))
            self.suspect.merge(SuspectCounter.from_dict(part.index.get("suspect", {})))
            self.parts.append(part)

    def _select(self, sizes: list[int], seed: int) -> None:
        """self.item_part / self.item_index: the (source, item) of each of this dataset's items."""
        if self.weights is None:
            self.item_part = np.zeros(sizes[0], dtype=np.int64)
            self.item_index = np.arange(sizes[0], dtype=np.int64)
        else:
            self.item_part, self.item_index = mix_indices(sizes, self.weights, seed)


def _pack(lengths: np.ndarray, rng: random.Random, capacity: int, pack: bool) -> tuple[np.ndarray, np.ndarray]:
    """(items of every row, one after the other; where each row starts): the items shuffled by `rng`, then packed
    best-fit into rows of `capacity` tokens, or one per row."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = pack_best_fit(lengths[order].tolist(), capacity) if pack else [[i] for i in range(len(order))]
    starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=starts[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=starts[-1])
    return np.asarray(order, dtype=np.int64)[flat], starts


def _packing_file(index_path: str, seed: int, pack: bool) -> Path:
    return Path(index_path[: -len(".json")] + f".rows-seed{seed}-{'packed' if pack else 'single'}.npz")


def _index_digest(index_path: str) -> str:
    return hashlib.sha256(Path(index_path).read_bytes()).hexdigest()


def _saved_packing(index_path: str | None, seed: int, pack: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The packing saved for these prepared files (their index, byte for byte), seed and layout, if any."""
    if index_path is None:
        return None
    try:
        with np.load(_packing_file(index_path, seed, pack)) as saved:
            if str(saved["index_digest"]) != _index_digest(index_path):
                return None
            return saved["row_items"], saved["row_starts"]
    except (OSError, KeyError, ValueError):
        return None


def _save_packing(index_path: str | None, seed: int, pack: bool, packing: tuple[np.ndarray, np.ndarray]) -> None:
    if index_path is None:
        return
    try:
        with atomic_path(_packing_file(index_path, seed, pack)) as tmp:
            np.savez(tmp, row_items=packing[0], row_starts=packing[1], index_digest=_index_digest(index_path))
    except OSError:
        pass  # a read-only cache: pack again next time


class SFTDataset(_ChatData):
    """Chat records as fixed-shape rows for SFT, read from prepared token files (dataset/prepared.py: tokenized
    once, cached, memory-mapped) or, with `in_memory=True`, tokenized here as the files are read.

    A row holds max_seq_len + 1 tokens: several whole conversations packed together (best-fit, so padding is a
    few percent), or one per row with `pack=False`. An item is four [max_seq_len] tensors (five, see below):

    - input_ids: the row's first max_seq_len tokens (pad id after the last conversation);
    - labels: labels[t] is token t+1 where that token is assistant output (every assistant turn's body and its
      `<|im_end|>`, see dataset.chat.tokenize_chat) in the same conversation as token t, else -100;
    - segment_ids: 1, 2, ... per packed conversation, 0 on padding, so that no token attends across
      conversations (the model's `segment_ids` argument);
    - position_ids: restarting at 0 with each conversation, as if it were alone.

    With `prompt_loss_weight` w > 0 the prompt is trained on too, at weight w (OpenAI's fine-tuning API had the same
    knob): labels cover every token of a conversation after its first (system and user turns, the chat template's
    headers), and a fifth tensor, loss_weights, is 1.0 where the target is assistant output and w elsewhere
    (trainer.chat_stage.assistant_loss divides the weighted sum by the weights' sum). The prompts are text in the
    corpus's language: a little loss on them keeps the language model that training on answers alone wears away.
    `token_weights` {token id: weight} multiplies the weight of those tokens where they are assistant output (or a
    document's text), and gives the row loss_weights too: a verdict token that decides a ten-token answer can count
    as much as the nine that every answer repeats.

    Conversations longer than max_seq_len + 1 tokens are cut (a message far longer than that is clipped before it is
    tokenized, see clip_long_texts); those left with no assistant token are dropped.
    With `system_prompt_ratio` > 0 that share of conversations without a system turn gets one drawn from
    `system_prompts` (seeded). `.stats` counts conversations, rows, tokens and the padding share.
    A document among the records (pretraining text, {"text"}: dataset.chat.document_segments) packs like a
    conversation, every token of it trained on: mixed in by weight, it replays pretraining in a chat stage.

    `cache_dir` keeps the prepared files for the next run (None: a temporary directory, removed with the dataset);
    `path` may mix sources by weight (`a.jsonl:0.7,b.jsonl:0.3`, dataset/mixing.py). Packing needs only the
    conversations' lengths, read from the offsets file.
    """

    stage = "sft"

    def __init__(self, path: str, tokenizer, max_seq_len: int, skip_bad: bool = False,
                 system_prompts: list[str] | None = None, system_prompt_ratio: float = 0.0, seed: int = 0,
                 pack: bool = True, quiet: bool = False, cache_dir: str | Path | None = None, num_workers: int = 0,
                 in_memory: bool = False, prompt_loss_weight: float = 0.0,
                 token_weights: dict[int, float] | None = None):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if not 0 <= prompt_loss_weight <= 1:
            raise ValueError(f"prompt_loss_weight must be in [0, 1], got {prompt_loss_weight}")
        say = (lambda *a: None) if quiet else print
        self.max_seq_len, self.pack, self.prompt_loss_weight = max_seq_len, pack, prompt_loss_weight
        self.token_weights = dict(token_weights or {})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        options = dict(max_seq_len=max_seq_len, skip_bad=skip_bad, system_prompt_ratio=system_prompt_ratio,
                       system_prompts=system_prompts, seed=seed)
        if not in_memory:
            options["num_workers"] = num_workers
        self._load(path, tokenizer, cache_dir, quiet, in_memory, **options)
        if self.skipped.total and in_memory:
            say(f"{path}: {self.skipped.summary()}")
        if self.suspect.total and in_memory:  # prepared files: prepare() says both, cached or not
            say(f"{path}: {self.suspect.summary()}")
        for files, part in zip(self._groups(path), self.parts):
            counts = part.index
            if counts["n_conversations"] == 0:
                reason = f"no conversation has an assistant token within max_seq_len {max_seq_len}" \
                    if counts["n_dropped"] else "no usable conversations"  # every record was skipped
                raise DataError(files, 0, f"{reason}; {self.skipped.summary()}" if self.skipped.total else reason)

        # The shuffle continues the system-prompt draws' generator, as when it all happened in one pass.
        rng = random.Random(seed)
        state = self.parts[0].index.get("rng_state") if self.weights is None else None
        if state is not None:
            rng.setstate((state[0], tuple(state[1]), state[2]))
        self._select([len(part.offsets) - 1 for part in self.parts], seed)
        part_lengths = [np.diff(part.offsets) for part in self.parts]
        first = np.cumsum([0] + [len(x) for x in part_lengths])  # where each source starts in the concatenation
        lengths = np.concatenate(part_lengths)[first[self.item_part] + self.item_index]
        # One prepared source: the packing is kept beside its files (the next start reads it instead of packing).
        saved = None if in_memory or self.weights is not None else self.parts[0].index["paths"]["index"]
        packing = _saved_packing(saved, seed, pack)
        if packing is None:
            packing = _pack(lengths, rng, max_seq_len + 1, pack)
            _save_packing(saved, seed, pack, packing)
        self.row_items, self.row_starts = packing
        n_rows = len(self.row_starts) - 1

        n_tokens = int(lengths.sum())
        self.stats = {
            "conversations": len(lengths), "rows": n_rows, "tokens": n_tokens,
            "assistant_tokens": self._assistant_tokens(), "padding": 1 - n_tokens / (n_rows * (max_seq_len + 1)),
            "truncated": sum(p.index["n_truncated"] for p in self.parts),
            "dropped": sum(p.index["n_dropped"] for p in self.parts),
        }
        say(self.describe(path))

    @staticmethod
    def _groups(path: str) -> list[str]:
        sources = parse_data_path(path)
        if sources and sources[0][1] is not None:
            return [p for p, _ in sources]
        return [",".join(p for p, _ in sources)]

    def _assistant_tokens(self) -> int:
        if self.weights is None:
            return self.parts[0].index["n_assistant_tokens"]
        total = 0
        for k, part in enumerate(self.parts):  # per conversation, then counted as often as it was drawn
            mask, starts = part.mask, part.offsets[:-1]
            per_conversation = np.add.reduceat(mask, starts, dtype=np.int64) - mask[starts]
            total += int(per_conversation[self.item_index[self.item_part == k]].sum())
        return total

    def _in_memory(self, files: list[str], tokenizer, max_seq_len, skip_bad, system_prompt_ratio, system_prompts,
                   seed) -> _InMemory:
        """The conversations of `files` tokenized here, one by one: the reference the prepared files must equal."""
        rng = random.Random(seed)
        prompts = system_prompts or DEFAULT_SYSTEM_PROMPTS
        skipped, suspect = SkipCounter(), SuspectCounter()
        token_lists, mask_lists = [], []
        truncated = dropped = 0
        budget = clip_budget(tokenizer, max_seq_len)
        for record in iter_records(",".join(files), "chat", skip_bad, skipped, suspect):
            record = clip_record(record, budget)
            if "messages" in record and system_prompt_ratio > 0 and record["messages"][0]["role"] != "system" \
                    and rng.random() < system_prompt_ratio:
                record = {**record, "messages": [{"role": "system", "content": rng.choice(prompts)},
                                                 *record["messages"]]}
            ids, mask = tokenize_segments(tokenizer, record_segments(record))
            if len(ids) > max_seq_len + 1:
                ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                truncated += 1
            if not any(mask[1:]):
                dropped += 1
                continue
            token_lists.append(ids)
            mask_lists.append(mask)
        state = rng.getstate()
        index = {"n_conversations": len(token_lists), "n_truncated": truncated, "n_dropped": dropped,
                 "n_assistant_tokens": sum(sum(m) - m[0] for m in mask_lists), "skipped": skipped.to_dict(),
                 "suspect": suspect.to_dict(), "rng_state": [state[0], list(state[1]), state[2]]}
        return _InMemory(token_lists, mask_lists, index)

    @property
    def tokens(self) -> np.ndarray:
        """Every conversation's tokens, one after the other (of the first source when several are mixed)."""
        return self.parts[0].tokens

    @property
    def masks(self) -> np.ndarray:
        """1 where a token of `tokens` is trained on."""
        return self.parts[0].mask

    @property
    def rows(self) -> list[list[int]]:
        """The items (conversations, or draws of a weighted mix) of each row, in row order."""
        return [self.row_items[a:b].tolist() for a, b in zip(self.row_starts[:-1], self.row_starts[1:])]

    def describe(self, path: str) -> str:
        """One line about the data: what was read, how it was packed, how much is padding."""
        s = self.stats
        layout = "packed" if self.pack else "one conversation per row"
        line = (f"{path}: {s['conversations']:,} conversations -> {s['rows']:,} rows of {self.max_seq_len} tokens "
                f"({layout}), {s['tokens']:,} tokens, {s['assistant_tokens']:,} trained on, "
                f"padding {s['padding']:.1%}")
        if self.prompt_loss_weight:
            line += f"; the prompts trained on too, at weight {self.prompt_loss_weight:g}"
        if self.token_weights:
            line += f"; {len(self.token_weights)} answer token(s) weighted"
        if s["truncated"] or s["dropped"]:
            line += (f"; {s['truncated']} cut at max_seq_len, {s['dropped']} dropped for having no assistant "
                     "token left")
        return line

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        width = self.max_seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        targets = np.zeros(width, dtype=bool)
        segments = np.zeros(width, dtype=np.int64)
        positions = np.zeros(width, dtype=np.int64)
        at = 0
        for segment, item in enumerate(self.row_items[self.row_starts[i]:self.row_starts[i + 1]].tolist(), 1):
            part = self.parts[self.item_part[item]]
            conversation = self.item_index[item]
            start, end = int(part.offsets[conversation]), int(part.offsets[conversation + 1])
            n = end - start
            tokens[at:at + n] = part.tokens[start:end]
            targets[at:at + n] = part.mask[start:end]
            segments[at:at + n] = segment
            positions[at:at + n] = np.arange(n)
            at += n
        same_conversation = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
        # With a prompt loss weight every next token of the same conversation is scored, the prompt's at that weight.
        scored = same_conversation if self.prompt_loss_weight else targets[1:] & same_conversation
        row = {"input_ids": torch.from_numpy(tokens[:-1]),
               "labels": torch.from_numpy(np.where(scored, tokens[1:], IGNORE_INDEX)),
               "segment_ids": torch.from_numpy(segments[:-1]), "position_ids": torch.from_numpy(positions[:-1])}
        if self.prompt_loss_weight or self.token_weights:
            weights = np.where(targets[1:], 1.0, self.prompt_loss_weight).astype(np.float32)
            for token, weight in self.token_weights.items():  # answer (and document) tokens that count more
                weights[targets[1:] & (tokens[1:] == token)] *= weight
            row["loss_weights"] = torch.from_numpy(weights)
        return row


class DPODataset(_ChatData):
    """Preference pairs for DPO, read from prepared token files (dataset/prepared.py: each pair's prompt, chosen and
    rejected continuation tokenized once) or, with `in_memory=True`, tokenized here.

    Labels are aligned (labels[t] is the target of position t) and are -100 everywhere except on the response's
    assistant tokens (each assistant turn's body and its `<|im_end|>`); assistant turns inside a multi-turn prompt
    are context, not response, and get -100 too. A conversation longer than max_seq_len + 1 tokens is cut from the
    end, keeping the prompt's start; if that would leave no response token at all, the prompt is cut from the left
    instead: the window then holds the end of the prompt and as much of the response as fits (all of it when it
    fits in half the window or less, else half prompt tail, half response head). Windows are cut when an item is
    read, so the prepared files serve every max_seq_len with the same clip budget.

    Item i: chosen_ids, chosen_labels, rejected_ids, rejected_labels (1-D), index = i, and, once
    `set_reference_logps` was called, ref_chosen_logps / ref_rejected_logps (scalars), so precomputed reference
    log-probs travel with their own pair whatever the batch order, rank or split.
    """

    stage = "dpo"

    def __init__(self, path: str, tokenizer, max_seq_len: int, skip_bad: bool = False, quiet: bool = False,
                 cache_dir: str | Path | None = None, num_workers: int = 0, seed: int = 0, in_memory: bool = False):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.pad_token_id or 0
        options = dict(max_seq_len=max_seq_len, skip_bad=skip_bad)
        if not in_memory:
            options["num_workers"] = num_workers
        self._load(path, tokenizer, cache_dir, quiet, in_memory, **options)
        if self.skipped.total and in_memory:
            print(f"{path}: {self.skipped.summary()}", flush=True)
        if self.suspect.total and in_memory and not quiet:  # prepared files: prepare() says it, cached or not
            print(f"{path}: {self.suspect.summary()}", flush=True)
        if any(part.index["n_pairs"] == 0 for part in self.parts):  # every record was skipped
            raise DataError(path, 0, f"no usable preference pairs; {self.skipped.summary()}")
        self._select([part.index["n_pairs"] for part in self.parts], seed)
        window = max_seq_len + 1
        self.n_truncated = 0
        for k, part in enumerate(self.parts):
            pieces = np.diff(part.offsets).reshape(-1, 3)[self.item_index[self.item_part == k]]
            self.n_truncated += int((pieces[:, 0] + pieces[:, 1] > window).sum() +
                                    (pieces[:, 0] + pieces[:, 2] > window).sum())
        self.ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None

    def _in_memory(self, files: list[str], tokenizer, max_seq_len, skip_bad) -> _InMemory:
        """Pairs tokenized here, each side as one whole conversation (an empty prompt piece, then prompt + response
        with the prompt's mask zeroed): the reference the prepared files must equal."""
        skipped, suspect = SkipCounter(), SuspectCounter()
        token_lists, mask_lists = [], []
        budget = clip_budget(tokenizer, max_seq_len)
        for record in iter_records(",".join(files), "dpo", skip_bad, skipped, suspect):
            prompt = clip_long_texts(record["prompt"], budget)
            prompt_len = len(tokenize_chat(tokenizer, prompt)[0])
            token_lists.append([])
            mask_lists.append([])
            for response in (record["chosen"], record["rejected"]):
                ids, mask = tokenize_chat(tokenizer, prompt + clip_long_texts(response, budget))
                token_lists.append(ids)
                mask_lists.append([0] * prompt_len + mask[prompt_len:])
        return _InMemory(token_lists, mask_lists, {"n_pairs": len(token_lists) // 3, "skipped": skipped.to_dict(),
                                                   "suspect": suspect.to_dict()})

    def _window(self, ids: Sequence[int], mask: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, aligned labels) of at most max_seq_len positions, truncated as the class docstring says."""
        window = self.max_seq_len + 1
        ids, mask = np.asarray(ids), np.asarray(mask)
        if len(ids) > window:
            first_response = int(np.argmax(mask)) if mask.any() else 0
            start = 0 if first_response < window else min(len(ids) - window, first_response - window // 2)
            ids, mask = ids[start : start + window], mask[start : start + window]
        tokens = torch.from_numpy(ids.astype(np.int64))
        labels = tokens[1:].masked_fill(torch.from_numpy(mask[1:] == 0), IGNORE_INDEX)
        return tokens[:-1], labels

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen ids, chosen labels, rejected ids, rejected labels) of item i."""
        part = self.parts[self.item_part[i]]
        a, b, c, d = (int(x) for x in part.offsets[3 * self.item_index[i]: 3 * self.item_index[i] + 4])
        prompt = part.tokens[a:b]
        sides = []
        for start, end in ((b, c), (c, d)):
            ids = np.concatenate([prompt, part.tokens[start:end]])
            mask = np.concatenate([np.zeros(b - a, dtype=np.uint8), part.mask[start:end]])
            sides += self._window(ids, mask)
        return tuple(sides)

    @property
    def pairs(self) -> "_Pairs":
        """pairs[i] is pair(i)."""
        return _Pairs(self)

    def set_reference_logps(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Attach the reference model's log-probs of every pair ([N] each, in dataset order)."""
        if chosen.shape != (len(self),) or rejected.shape != (len(self),):
            raise ValueError(f"expected reference log-probs of shape ({len(self)},), got {tuple(chosen.shape)} "
                             f"and {tuple(rejected.shape)}")
        self.ref_logps = (chosen.detach().float().cpu(), rejected.detach().float().cpu())

    def __len__(self) -> int:
        return len(self.item_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = self.pair(i)
        item = {"chosen_ids": chosen_ids, "chosen_labels": chosen_labels, "rejected_ids": rejected_ids,
                "rejected_labels": rejected_labels, "index": torch.tensor(i)}
        if self.ref_logps is not None:
            item["ref_chosen_logps"], item["ref_rejected_logps"] = self.ref_logps[0][i], self.ref_logps[1][i]
        return item


class _Pairs:
    def __init__(self, data: DPODataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.pair(i)


class RLPromptDataset(_ChatData):
    """Prompt sets for the RL stages (dataset/formats.py's "rl" records: {"prompt", "task"?, "answer"?, ...} or chat
    records cut after the user's last turn), prepared once: item i is prompt_ids (the rendered prompt with
    `<|im_start|>assistant\\n` at the end, ready to generate from), the canonical record's messages and meta (task,
    answer, ... for the reward functions), and index."""

    stage = "rl"

    def __init__(self, path: str, tokenizer, skip_bad: bool = False, quiet: bool = False,
                 cache_dir: str | Path | None = None, num_workers: int = 0, seed: int = 0):
        self._load(path, tokenizer, cache_dir, quiet, False, skip_bad=skip_bad, num_workers=num_workers)
        if any(part.index["n_prompts"] == 0 for part in self.parts):
            raise DataError(path, 0, f"no usable prompts; {self.skipped.summary()}")
        self._select([part.index["n_prompts"] for part in self.parts], seed)

    def __len__(self) -> int:
        return len(self.item_index)

    def __getitem__(self, i: int) -> dict:
        part, k = self.parts[self.item_part[i]], int(self.item_index[i])
        ids = torch.from_numpy(part.tokens[part.offsets[k]:part.offsets[k + 1]].astype(np.int64))
        return {"prompt_ids": ids, **part.meta(k), "index": i}


def collate_dpo(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows, chosen rows first, then rejected, right-padded to the longest row.

    input_ids [2B, L] (pad_id after the end), labels [2B, L] (-100 after the end), attention_mask [2B, L] (1 on real
    tokens), index [B]; plus ref_chosen_logps / ref_rejected_logps [B] when the items carry them. One forward pass
    over the 2B rows scores both sides.
    """
    rows = [(item["chosen_ids"], item["chosen_labels"]) for item in items]
    rows += [(item["rejected_ids"], item["rejected_labels"]) for item in items]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, row_labels, 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "index": torch.stack([item["index"] for item in items])}
    if "ref_chosen_logps" in items[0]:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.stack([item[key] for item in items])
    return batch
