"""Datasets that feed the training stages. Each turns prepared data into fixed-shape tensors; none tokenizes
more than once."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class PretrainDataset(Dataset):
    """Packed pretraining windows over a uint16 token file written by scripts/prepare_data.py.

    Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1): input_ids are its first seq_len tokens and
    labels the next token of each position (labels[t] is the target for position t; the model does not
    shift). Windows do not overlap, so one epoch sees each token as a target once; documents run into each
    other, separated by <|endoftext|>, and nothing is padded.
    """

    def __init__(self, bin_path: str, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not Path(bin_path).is_file():
            raise FileNotFoundError(f"{bin_path}: no token file; make one with scripts/prepare_data.py")
        self.bin_path, self.seq_len = str(bin_path), seq_len
        # mode "r" on an empty file fails in numpy, and an empty bin has no windows anyway.
        n_bytes = Path(bin_path).stat().st_size
        self.tokens = np.memmap(bin_path, dtype=np.uint16, mode="r") if n_bytes else np.zeros(0, dtype=np.uint16)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}
