"""Batches processed samples: pads text, concatenates images, reports skipped samples."""

from __future__ import annotations

from typing import Any

import torch

from ..loss import IGNORE_INDEX
from .batch import Batch

PER_IMAGE_KEYS = ("pixel_values", "image_features", "image_grids")
"""Item keys holding one entry per image (pixel_values: per view, with tiling): concatenated in the order
the samples sit in the batch."""


class Collator:
    """Items are processor outputs, or `{"skipped": id, "category": ..., "detail": ...}` for bad samples;
    the output is a `Batch` (vlm/data/batch.py, which says every field's shape), images in sample order,
    each row's `image_seen` offset by the images of the rows before it. A bad sample's report is in
    `Batch.skipped`, whether it came alone or with the sample that replaced it (`"replaced"`, see
    `ConversationDataset`); a batch of only reports has no inputs (`has_inputs`).
    `padding_side="left"` for generation, so every prompt ends at the last position.
    A batch of preference pairs has 2 x pairs rows (`Batch.pairs`); the rejected rows' `image_seen` continue
    past the chosen rows' images, into the list's second copy (`VLM.forward`'s `image_repeats`).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        skipped = [item for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        skipped += [report for item in items for report in item.get("replaced", ())]
        if not items:
            return Batch(ids=[], skipped=skipped)
        return Batch(skipped=skipped, **self.arrange(items))

    def arrange(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The loaded items as one padded row each, with their `ids` (packing overrides this). Preference pairs
        (items with `rejected`): the chosen rows, then the rejected rows in the same order, the images once."""
        ids = [item["id"] for item in items]
        if any("rejected" in item for item in items):
            missing = [item["id"] for item in items if "rejected" not in item]
            if missing:
                raise ValueError(f"A batch mixes preference pairs and plain samples (e.g. '{missing[0]}'); "
                                 "train.objective=dpo reads pairs only.")
            return {"ids": ids, "pairs": True, **self.pad([*items, *(item["rejected"] for item in items)])}
        return {"ids": ids, **self.pad(items)}

    def pad(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows (dicts of input_ids / labels / image_seen [n] and, when packed, position_ids [n]) -> padded
        tensors [rows, longest]; the per-image keys concatenated in row order, and each row's image_seen
        offset by the images of the rows before it. Padding continues position_ids from 0, as one more
        (unsupervised) run of positions."""
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        packed = "position_ids" in rows[0]
        position_ids = torch.zeros((len(rows), length), dtype=torch.long) if packed else None
        with_seen = all(row.get("image_seen") is not None for row in rows)
        image_seen = torch.full((len(rows), length), -1, dtype=torch.long) if with_seen else None
        images_before = 0
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            cols = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[r, cols] = row["input_ids"]
            labels[r, cols] = row["labels"]
            attention_mask[r, cols] = 1
            if image_seen is not None:
                seen = row["image_seen"]
                image_seen[r, cols] = torch.where(seen >= 0, seen + images_before, -1)
                images_before += images_in(seen)
            if position_ids is not None:
                position_ids[r, :n] = row["position_ids"]
                position_ids[r, n:] = torch.arange(length - n)
        out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                               "image_seen": image_seen}
        if position_ids is not None:
            out["position_ids"] = position_ids
        for key in PER_IMAGE_KEYS:
            parts = [row[key] for row in rows if row.get(key) is not None]
            out[key] = torch.cat(parts) if parts else None
        return out


def images_in(image_seen: torch.Tensor) -> int:
    """Images of one row or sample, from its image_seen [n] (indices from 0 within it; every image has a marker)."""
    return int(image_seen.max()) + 1 if len(image_seen) else 0
