"""Which samples each rank reads, in an order that a resumed run can pick up mid-epoch."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (the epoch's permutation comes from seed + epoch, rank r takes every
    world-th index) that can start `start` indices into this rank's share.

    With batch size B on W ranks, step k's global batch is exactly what one process with batch W*B
    reads at step k, so sharded and single-process runs see the same data.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)
