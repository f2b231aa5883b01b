"""Multimodal sequence packing (`data.packing`): a step's samples share rows of up to `data.max_length`.

Each step still reads `train.batch_size` samples (so resume, sharding and the global-token loss
normalisation are unchanged); the collator places them into as few rows as first-fit-decreasing
finds, filled evenly (a batch is padded to its longest row), at most `data.packing_max_images`
images per row. Samples are never split, so an image's
tokens never are; each keeps its own labels, and its positions restart at 0, from which the model
builds attention that keeps samples apart (vlm/packed_attention.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..loss import IGNORE_INDEX
from .batch import Batch
from .collator import PER_IMAGE_KEYS, Collator, images_in


def first_fit_decreasing(
    lengths: Sequence[int], images: Sequence[int], max_length: int, max_images: int | None = None,
) -> list[list[int]]:
    """Indices grouped into bins of total length <= max_length and at most max_images images: the longest
    first, each into the first bin with room, else a new bin. Bins keep their samples longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    image_room: list[float] = []
    budget = float("inf") if max_images is None else max_images
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_length or images[i] > budget:
            raise ValueError(f"A sample of {lengths[i]} tokens and {images[i]} image(s) cannot fit one pack of "
                             f"data.max_length={max_length} and data.packing_max_images={max_images}.")
        target = next((b for b in range(len(bins)) if room[b] >= lengths[i] and image_room[b] >= images[i]), None)
        if target is None:
            bins.append([])
            room.append(max_length)
            image_room.append(budget)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= lengths[i]
        image_room[target] -= images[i]
    return bins


def balanced_bins(
    lengths: Sequence[int], images: Sequence[int], max_length: int, max_images: int | None = None,
) -> list[list[int]]:
    """As many bins as first-fit-decreasing needs, filled evenly: the longest first, each into the
    currently shortest bin it fits (longest-processing-time). A batch is padded to its longest row, so
    even rows waste less than FFD's full rows and one short last row. Falls back to FFD's bins when the
    even fill cannot place a sample within the budgets."""
    ffd = first_fit_decreasing(lengths, images, max_length, max_images)
    budget = float("inf") if max_images is None else max_images
    bins: list[list[int]] = [[] for _ in ffd]
    used, used_images = [0] * len(ffd), [0] * len(ffd)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if used[b] + lengths[i] <= max_length
                and used_images[b] + images[i] <= budget]
        if not fits:
            return ffd
        target = min(fits, key=lambda b: (used[b], b))
        bins[target].append(i)
        used[target] += lengths[i]
        used_images[target] += images[i]
    return bins


def num_images(item: dict[str, Any]) -> int:
    """Tower inputs of a processed item (its pixel / feature tensors' first dimension; with tiling, its views)."""
    return next((len(item[key]) for key in PER_IMAGE_KEYS if item.get(key) is not None), 0)


class PackingCollator(Collator):
    """A Collator whose rows hold several samples: input_ids / labels / attention_mask / position_ids
    [rows, longest row]; pixel_values / image_features in row order (the order of `ids`)."""

    def __init__(self, pad_token_id: int, max_length: int, max_images: int | None = None) -> None:
        super().__init__(pad_token_id, "right")
        self.max_length = max_length
        self.max_images = max_images

    def arrange(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        bins = balanced_bins(
            [len(item["input_ids"]) for item in items], [num_images(item) for item in items],
            self.max_length, self.max_images,
        )
        rows = [pack_row([items[i] for i in members]) for members in bins]
        return {"ids": [items[i]["id"] for members in bins for i in members],
                "samples_per_row": [len(members) for members in bins], **self.pad(rows)}


def pack_row(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples concatenated into one row; positions restart at each sample and its first label is ignored
    (in the row it would be the previous sample's last token's target; alone it is nobody's)."""
    labels = [item["labels"].clone() for item in items]
    for part in labels:
        part[0] = IGNORE_INDEX
    row: dict[str, Any] = {
        "input_ids": torch.cat([item["input_ids"] for item in items]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(len(item["input_ids"])) for item in items]),
        "image_seen": None,
    }
    if all(item.get("image_seen") is not None for item in items):
        # Each sample's indices start at -1 (no image yet), so no position sees an earlier sample's image.
        seen, before = [], 0
        for item in items:
            seen.append(torch.where(item["image_seen"] >= 0, item["image_seen"] + before, -1))
            before += images_in(item["image_seen"])
        row["image_seen"] = torch.cat(seen)
    for key in PER_IMAGE_KEYS:
        parts = [item[key] for item in items if item.get(key) is not None]
        row[key] = torch.cat(parts) if parts else None
    return row


def padding_share(batch: Batch) -> float:
    """Share of a collated batch's positions that are padding."""
    mask = batch.attention_mask
    return 1.0 - float(mask.sum()) / mask.numel()
