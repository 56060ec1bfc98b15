"""Datasets that feed the training stages. Each turns prepared data into fixed-shape tensors; none tokenizes
more than once."""

import bisect
import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.chat import IGNORE_INDEX, tokenize_chat
from dataset.errors import DataError, SkipCounter
from dataset.formats import iter_records


class PretrainDataset(Dataset):
    """Packed pretraining windows over uint16 token files written by dataset/bins.py.

    Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1): input_ids are its first seq_len tokens and
    labels the next token of each position (labels[t] is the target for position t; the model does not
    shift). Windows do not overlap, so one epoch sees each token as a target once; documents run into each
    other, separated by <|endoftext|>, and nothing is padded. Several token files (one per source file) are
    windowed one after the other, each on its own: no window spans two files.
    """

    def __init__(self, bin_paths: str | Path | Sequence[str | Path], seq_len: int):
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
        # starts[k]: the index of file k's first window; starts[-1]: the number of windows.
        self.starts = np.cumsum([0] + [max(0, (len(tokens) - 1) // seq_len) for tokens in self.parts]).tolist()

    @property
    def n_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.parts)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        part = bisect.bisect_right(self.starts, i) - 1
        start = (i - self.starts[part]) * self.seq_len
        window = torch.from_numpy(self.parts[part][start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}


# --- SFT: chat records, tokenized once, packed into rows -------------------------------------------------------


def clip_budget(tokenizer, max_seq_len: int) -> int:
    """How many characters from either end of one text are enough for any window of max_seq_len + 1 tokens.

    No token covers more characters than its vocabulary entry is long (byte-level entries spell one byte per
    character, and a character is at least one byte), so this many characters hold more than a window's tokens,
    with 64 to spare for the merges next to a cut.
    """
    return (max_seq_len + 1 + 64) * max(map(len, tokenizer.get_vocab()))


def clip_long_texts(messages: list[dict], budget: int) -> list[dict]:
    """Messages whose content or reasoning is longer than 2 * budget characters keep only their first and last
    `budget` characters. Tokenizing a 10 MB message takes seconds and every token past the window is cut anyway;
    with both ends kept, the tokens a window can hold are the same whether it keeps a text's start (SFT, DPO) or,
    for a long DPO prompt, its end."""
    def clip(text: str) -> str:
        return text if len(text) <= 2 * budget else text[:budget] + text[-budget:]

    return [{**m, **{key: clip(m[key]) for key in ("content", "reasoning_content") if isinstance(m.get(key), str)}}
            for m in messages]


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


class SFTDataset(Dataset):
    """Chat records as fixed-shape rows for SFT, each conversation tokenized once when the dataset is built.

    A row holds max_seq_len + 1 tokens: several whole conversations packed together (best-fit, so padding is a
    few percent), or one per row with `pack=False`. An item is four [max_seq_len] tensors:

    - input_ids: the row's first max_seq_len tokens (pad id after the last conversation);
    - labels: labels[t] is token t+1 where that token is assistant output (every assistant turn's body and its
      `<|im_end|>`, see dataset.chat.tokenize_chat) in the same conversation as token t, else -100;
    - segment_ids: 1, 2, ... per packed conversation, 0 on padding, so that no token attends across
      conversations (the model's `segment_ids` argument);
    - position_ids: restarting at 0 with each conversation, as if it were alone.

    Conversations longer than max_seq_len + 1 tokens are cut (a message far longer than that is clipped before it is
    tokenized, see clip_long_texts); those left with no assistant token are dropped.
    With `system_prompt_ratio` > 0 that share of conversations without a system turn gets one drawn from
    `system_prompts` (seeded). `.stats` counts conversations, rows, tokens and the padding share.
    """

    def __init__(self, path: str, tokenizer, max_seq_len: int, skip_bad: bool = False,
                 system_prompts: list[str] | None = None, system_prompt_ratio: float = 0.0, seed: int = 0,
                 pack: bool = True, quiet: bool = False):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        say = (lambda *a: None) if quiet else print
        self.max_seq_len, self.pack = max_seq_len, pack
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rng = random.Random(seed)
        prompts = system_prompts or DEFAULT_SYSTEM_PROMPTS

        self.skipped = SkipCounter()
        token_lists, mask_lists = [], []
        truncated = dropped = 0
        budget = clip_budget(tokenizer, max_seq_len)
        for record in iter_records(path, "chat", skip_bad, self.skipped):
            messages = clip_long_texts(record["messages"], budget)
            if system_prompt_ratio > 0 and messages[0]["role"] != "system" and rng.random() < system_prompt_ratio:
                messages = [{"role": "system", "content": rng.choice(prompts)}, *messages]
            ids, mask = tokenize_chat(tokenizer, messages, record.get("tools"))
            if len(ids) > max_seq_len + 1:
                ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
                truncated += 1
            if not any(mask[1:]):
                dropped += 1
                continue
            token_lists.append(ids)
            mask_lists.append(mask)
        if self.skipped.total:
            say(f"{path}: {self.skipped.summary()}")
        if not token_lists:
            reason = f"no conversation has an assistant token within max_seq_len {max_seq_len}" if dropped else \
                "no usable conversations"  # every record was skipped
            raise DataError(path, 0, f"{reason}; {self.skipped.summary()}" if self.skipped.total else reason)

        lengths = [len(ids) for ids in token_lists]
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=self.offsets[-1])
        self.masks = np.fromiter(itertools.chain.from_iterable(mask_lists), dtype=bool, count=self.offsets[-1])

        order = list(range(len(lengths)))
        rng.shuffle(order)
        if pack:
            packed = pack_best_fit([lengths[i] for i in order], max_seq_len + 1)
            self.rows = [[order[i] for i in row] for row in packed]
        else:
            self.rows = [[i] for i in order]

        n_tokens = int(self.offsets[-1])
        self.stats = {
            "conversations": len(lengths), "rows": len(self.rows), "tokens": n_tokens,
            "assistant_tokens": int(self.masks.sum() - self.masks[self.offsets[:-1]].sum()),
            "padding": 1 - n_tokens / (len(self.rows) * (max_seq_len + 1)),
            "truncated": truncated, "dropped": dropped,
        }
        say(self.describe(path))

    def describe(self, path: str) -> str:
        """One line about the data: what was read, how it was packed, how much is padding."""
        s = self.stats
        layout = "packed" if self.pack else "one conversation per row"
        line = (f"{path}: {s['conversations']:,} conversations -> {s['rows']:,} rows of {self.max_seq_len} tokens "
                f"({layout}), {s['tokens']:,} tokens, {s['assistant_tokens']:,} trained on, "
                f"padding {s['padding']:.1%}")
        if s["truncated"] or s["dropped"]:
            line += (f"; {s['truncated']} cut at max_seq_len, {s['dropped']} dropped for having no assistant "
                     "token left")
        return line

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        width = self.max_seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        targets = np.zeros(width, dtype=bool)
        segments = np.zeros(width, dtype=np.int64)
        positions = np.zeros(width, dtype=np.int64)
        at = 0
        for segment, conversation in enumerate(self.rows[i], 1):
            start, end = self.offsets[conversation], self.offsets[conversation + 1]
            n = end - start
            tokens[at:at + n] = self.tokens[start:end]
            targets[at:at + n] = self.masks[start:end]
            segments[at:at + n] = segment
            positions[at:at + n] = np.arange(n)
            at += n
        same_conversation = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
        labels = np.where(targets[1:] & same_conversation, tokens[1:], IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(tokens[:-1]), "labels": torch.from_numpy(labels),
                "segment_ids": torch.from_numpy(segments[:-1]), "position_ids": torch.from_numpy(positions[:-1])}


class DPODataset(Dataset):
    """Preference pairs for DPO: each record's prompt + chosen and prompt + rejected, tokenized once, up front.

    Labels are aligned (labels[t] is the target of position t) and are -100 everywhere except on the response's
    assistant tokens (each assistant turn's body and its `<|im_end|>`); assistant turns inside a multi-turn prompt
    are context, not response, and get -100 too. A conversation longer than max_seq_len + 1 tokens is cut from the
    end, keeping the prompt's start; if that would leave no response token at all, the prompt is cut from the left
    instead: the window then holds the end of the prompt and as much of the response as fits (all of it when it
    fits in half the window or less, else half prompt tail, half response head).

    Item i: chosen_ids, chosen_labels, rejected_ids, rejected_labels (1-D), index = i, and, once
    `set_reference_logps` was called, ref_chosen_logps / ref_rejected_logps (scalars), so precomputed reference
    log-probs travel with their own pair whatever the batch order, rank or split.
    """

    def __init__(self, path: str, tokenizer, max_seq_len: int, skip_bad: bool = False):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.pad_token_id or 0
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_truncated = 0
        self.skipped = SkipCounter()
        budget = clip_budget(tokenizer, max_seq_len)
        for record in iter_records(path, "dpo", skip_bad, self.skipped):
            prompt = clip_long_texts(record["prompt"], budget)
            prompt_len = len(tokenize_chat(tokenizer, prompt)[0])
            pair = []
            for response in (record["chosen"], record["rejected"]):
                ids, mask = tokenize_chat(tokenizer, prompt + clip_long_texts(response, budget))
                mask = [0] * prompt_len + mask[prompt_len:]
                pair += self._window(ids, mask)
            self.pairs.append(tuple(pair))
        if self.skipped.total:
            print(f"{path}: {self.skipped.summary()}", flush=True)
        if not self.pairs:  # every record was skipped
            raise DataError(path, 0, f"no usable preference pairs; {self.skipped.summary()}")
        self.ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None

    def _window(self, ids: list[int], mask: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, aligned labels) of at most max_seq_len positions, truncated as the class docstring says."""
        window = self.max_seq_len + 1
        if len(ids) > window:
            self.n_truncated += 1
            first_response = mask.index(1) if 1 in mask else 0
            start = 0 if first_response < window else min(len(ids) - window, first_response - window // 2)
            ids, mask = ids[start : start + window], mask[start : start + window]
        tokens = torch.tensor(ids, dtype=torch.long)
        labels = tokens[1:].masked_fill(torch.tensor(mask[1:]) == 0, IGNORE_INDEX)
        return tokens[:-1], labels

    def set_reference_logps(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Attach the reference model's log-probs of every pair ([N] each, in dataset order)."""
        if chosen.shape != (len(self),) or rejected.shape != (len(self),):
            raise ValueError(f"expected reference log-probs of shape ({len(self)},), got {tuple(chosen.shape)} "
                             f"and {tuple(rejected.shape)}")
        self.ref_logps = (chosen.detach().float().cpu(), rejected.detach().float().cpu())

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = self.pairs[i]
        item = {"chosen_ids": chosen_ids, "chosen_labels": chosen_labels, "rejected_ids": rejected_ids,
                "rejected_labels": rejected_labels, "index": torch.tensor(i)}
        if self.ref_logps is not None:
            item["ref_chosen_logps"], item["ref_rejected_logps"] = self.ref_logps[0][i], self.ref_logps[1][i]
        return item


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
