"""Which samples each rank reads, in an order a resumed run can pick up mid-epoch.

`ResumableSampler` (random order) and `LengthGroupedSampler` (`data.group_by_length`: batches of
similar length, so less padding; with `data.group_by_modality_length` also never mixing image and text-only
samples in a batch) share one interface: `set_epoch(epoch)`, `set_position(epoch,
start)` to resume `start` indices into this rank's share, `len()` of what is left. Both give rank r
every world_size-th index of one global order drawn from seed + epoch, so with batch size B on W
ranks, step k's batches on all ranks together are exactly the k-th global batch of W*B samples that
one process with batch W*B reads: sharded and single-process runs see the same data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from .sample import Sample

if TYPE_CHECKING:  # the processor (vlm/processor.py) imports this package's modules
    from ..processor import VLMProcessor


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (the epoch's permutation comes from seed + epoch, rank r takes every
    world-th index) that can start `start` indices into this rank's share."""

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


class LengthGroupedSampler(Sampler[int]):
    """Indices of a map-style dataset for one rank, in transformers' length-grouped order
    (`get_length_grouped_indices`: random mega-batches, each sorted by length, the longest batch
    first so an out-of-memory shows at step 1)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
        mega_batch_mult: int | None = None, has_image: Sequence[bool] | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside a world of {num_replicas} process(es).")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.has_image = None if has_image is None else list(has_image)
        """Given (`data.group_by_modality_length`): every global batch is all image samples or all text-only,
        bar one mixed batch of the two modalities' leftovers at the end of the epoch."""
        self.epoch = 0
        self.start = 0
        self.num_samples = -(-len(self.lengths) // num_replicas)  # ceil: every rank gets as many

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def global_order(self) -> list[int]:
        """The epoch's order over all ranks, padded (by wrapping around) to a multiple of the world size."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.has_image is None:
            order = self._grouped(list(range(len(self.lengths))), generator)
        else:
            order = self._by_modality(generator)
        total = self.num_samples * self.num_replicas
        return (order * (1 + total // max(len(order), 1)))[:total]

    def _grouped(self, indices: list[int], generator: torch.Generator) -> list[int]:
        """`indices` in transformers' length-grouped order for global batches of batch_size x world."""
        order = get_length_grouped_indices(
            [self.lengths[i] for i in indices], self.batch_size * self.num_replicas, self.mega_batch_mult,
            generator=generator,
        )
        return [indices[i] for i in order]

    def _by_modality(self, generator: torch.Generator) -> list[int]:
        """Length-grouped within each modality, cut into global batches, the whole ones shuffled together."""
        size = self.batch_size * self.num_replicas
        whole, rest = [], []
        for modality in (True, False):
            order = self._grouped([i for i, image in enumerate(self.has_image) if image == modality], generator)
            cut = len(order) - len(order) % size
            whole += [order[i : i + size] for i in range(0, cut, size)]
            rest += order[cut:]
        shuffled = [whole[i] for i in torch.randperm(len(whole), generator=generator).tolist()]
        return [i for batch in shuffled for i in batch] + rest

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank :: self.num_replicas][self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def estimate_lengths(samples: Sequence[Sample], processor: VLMProcessor, chunk: int = 1024) -> list[int]:
    """Tokens per sample without the chat template's markup: text tokens plus image tokens.

    Cheap enough for a whole dataset (batched fast tokenisation, no image decoding); the sampler
    only needs lengths to rank samples, not exact ones.
    """
    per_image = max(processor.tokens_per_image, 1)
    lengths = []
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        texts = ["\n".join(m["content"] for m in s.messages) for s in part]
        encoded = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for sample, ids in zip(part, encoded):
            lengths.append(len(ids) + len(sample.images) * (per_image - 1))
    return lengths


def training_sampler(
    dataset: Dataset, processor: VLMProcessor, batch_size: int, num_replicas: int, rank: int, seed: int,
    group_by_length: bool, group_by_modality: bool = False,
) -> ResumableSampler | LengthGroupedSampler:
    """The training set's sampler: length-grouped with `data.group_by_length`, also by modality with
    `data.group_by_modality_length`, else shuffled."""
    if group_by_length or group_by_modality:
        lengths = estimate_lengths(dataset.samples, processor)
        has_image = [bool(sample.images) for sample in dataset.samples] if group_by_modality else None
        return LengthGroupedSampler(lengths, batch_size, num_replicas, rank, seed=seed, has_image=has_image)
    return ResumableSampler(dataset, num_replicas, rank, shuffle=True, seed=seed)
