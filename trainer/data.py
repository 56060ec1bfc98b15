"""Batches in a reproducible, resumable, rank-sharded order."""

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, cut into global batches of batch_size x world_size samples;
    rank r takes slice r of each global batch. So 2 ranks x batch b see exactly the samples that
    1 rank x batch 2b sees, and a run resumed at `start` samples (under any world size) continues
    the same order. The last incomplete global batch is dropped so ranks stay in step."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch` after its first `start` samples (a multiple of the global batch)."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        usable = self.batches_per_epoch() * self.global_batch
        for begin in range(self.start, usable, self.global_batch):
            mine = begin + self.rank * self.batch_size
            yield from order[mine:mine + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(self.batches_per_epoch() * self.global_batch - self.start, 0) // self.world_size


def make_loader(dataset: Dataset, sampler: ResumableSampler, collate_fn=None, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    # Its own generator: creating a loader must not draw from the global RNG that --resume restores.
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                      generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch))


def move_to(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
