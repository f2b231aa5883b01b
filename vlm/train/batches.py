"""From the training set to the tensors one step feeds the model, and where in the data a step is.

`micro_batches` yields each step's micro-batches together with the `DataPosition` after them; it
reads the position it starts from and changes nothing else, so the trainer decides when a step's
data counts as consumed (see `Trainer.step`).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import Config
from ..data.batch import Batch
from ..data.collator import Collator
from ..data.dataset import ConversationDataset
from ..data.packing import PackingCollator
from ..data.sample import DataError
from .state import DataPosition

def make_loader(
    dataset: ConversationDataset, processor_pad: int, batch_size: int, shuffle: bool, config: Config,
    sampler: Sampler | None = None, packing: bool = False,
) -> DataLoader:
    """Batches of `batch_size` samples; with `packing` (training with data.packing) placed into packed rows."""
    generator = torch.Generator().manual_seed(config.train.seed)
    collate = (PackingCollator(processor_pad, config.data.max_length, config.data.packing_max_images)
               if packing else Collator(processor_pad, "right"))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None, sampler=sampler,
        collate_fn=collate, num_workers=config.data.num_workers, generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def micro_batches(
    loader: DataLoader, sampler: Any, dataset: ConversationDataset, start: DataPosition, per_step: int,
    batch_size: int,
) -> Iterator[tuple[list[Batch], DataPosition]]:
    """This process's micro-batches, `per_step` at a time, epoch after epoch from `start`, each group
    with the position after it (what a checkpoint taken after that step resumes from). A partial step
    at the end of an epoch is dropped, like `drop_last`."""
    position = start
    while True:
        sampler.set_position(position.epoch, position.batches_in_epoch * batch_size)
        dataset.set_epoch(position.epoch)
        batches, yielded = iter(loader), False
        while len(micro := [b for _, b in zip(range(per_step), batches)]) == per_step:
            position = position.after(per_step)
            yielded = True
            yield micro, position
        if not yielded and position.batches_in_epoch == 0:
            raise ValueError(
                f"One optimizer step needs {per_step} batch(es) of {batch_size} per process, but this process's "
                "share of the data has fewer; lower train.batch_size or train.grad_accum."
            )
        position = position.next_epoch()


def check_loadable(dataset: ConversationDataset) -> None:
    """Stop before step 1, in one line, when no training sample loads (the dataset replaces each unreadable
    sample by the next one that loads, so it needs one)."""
    for index in range(len(dataset)):
        if "skipped" not in dataset.load_or_report(index):
            return
    raise DataError(f"None of the {len(dataset)} training samples could be loaded; run `vlm data check` on them.")
